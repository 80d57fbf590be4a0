//! Who may call each RPC, as the proto files declare it: every RPC of an
//! `eventfold.*` package carries `option (eventfold.auth.v1.access)`, either
//! `public: true` or the roles that may call it. The policy is read from the
//! encoded descriptor sets the servers already ship for reflection, so the
//! rule sits beside the RPC it guards and no second list can drift.
//!
//! An `eventfold.*` RPC without a usable rule is an error when the policy is
//! built (a server refuses to start), and a test over the catalog fails
//! first. RPCs of other packages (gRPC health, reflection) are not in the
//! policy: [`Policy::rule`] answers `None` and the layer leaves them open.

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, MethodDescriptor, Value};

use super::ADMIN_ROLE;

/// The method option that holds an RPC's rule (`proto/eventfold/auth/v1/auth.proto`).
pub const ACCESS_EXTENSION: &str = "eventfold.auth.v1.access";
/// RPCs of packages with this prefix must carry [`ACCESS_EXTENSION`].
const GOVERNED_PACKAGE_PREFIX: &str = "eventfold.";

/// Who may call one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, without credentials.
    Public,
    /// A caller holding one of these roles (or `admin`).
    Roles(Vec<String>),
}

impl Rule {
    /// Whether a caller with `roles` may call the RPC. `admin` may call
    /// every RPC.
    pub fn allows(&self, roles: &[String]) -> bool {
        match self {
            Rule::Public => true,
            Rule::Roles(allowed) => roles.iter().any(|role| role == ADMIN_ROLE || allowed.contains(role)),
        }
    }
}

/// A descriptor set the policy cannot be built from.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot decode the descriptor set: {0}")]
    Decode(#[from] prost_reflect::DescriptorError),
    #[error("the RPC {rpc} has no ({ACCESS_EXTENSION}) option: declare its roles or `public: true`")]
    Missing { rpc: String },
    #[error("the ({ACCESS_EXTENSION}) option of the RPC {rpc} {problem}")]
    Invalid { rpc: String, problem: &'static str },
}

/// The rule of every `eventfold.*` RPC, by gRPC path (`/pkg.Service/Method`).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: BTreeMap<String, Rule>,
}

impl Policy {
    /// The policy of every service in `sets` (encoded
    /// `google.protobuf.FileDescriptorSet`s; a file present in several is
    /// read once).
    ///
    /// # Errors
    ///
    /// A set that does not decode, or an RPC of an `eventfold.*` package
    /// without the option, with neither `public` nor a role, with both, or
    /// with a blank role.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Policy, PolicyError> {
        let mut pool = DescriptorPool::new();
        for set in sets {
            pool.decode_file_descriptor_set(*set)?;
        }
        let extension = pool.get_extension_by_name(ACCESS_EXTENSION);
        let mut rules = BTreeMap::new();
        for service in pool.services() {
            if !service.package_name().starts_with(GOVERNED_PACKAGE_PREFIX) {
                continue;
            }
            for method in service.methods() {
                let rule = rule_of(&method, extension.as_ref())?;
                rules.insert(format!("/{}/{}", service.full_name(), method.name()), rule);
            }
        }
        Ok(Policy { rules })
    }

    /// The rule of the RPC at `grpc_path` (`/pkg.Service/Method`), `None`
    /// when the RPC is not governed by the policy (not an `eventfold.*`
    /// service, or unknown).
    pub fn rule(&self, grpc_path: &str) -> Option<&Rule> {
        self.rules.get(grpc_path)
    }

    /// Every governed RPC's gRPC path and rule, in path order.
    pub fn rules(&self) -> impl Iterator<Item = (&str, &Rule)> {
        self.rules.iter().map(|(path, rule)| (path.as_str(), rule))
    }
}

/// The rule the `access` option of `method` declares.
fn rule_of(method: &MethodDescriptor, extension: Option<&ExtensionDescriptor>) -> Result<Rule, PolicyError> {
    let rpc = || method.full_name().to_owned();
    let options = method.options();
    let Some(extension) = extension.filter(|extension| options.has_extension(extension)) else {
        return Err(PolicyError::Missing { rpc: rpc() });
    };
    let invalid = |problem| PolicyError::Invalid { rpc: rpc(), problem };
    let access = options.get_extension(extension);
    let Value::Message(access) = access.as_ref() else {
        return Err(invalid("is not an eventfold.auth.v1.Access message"));
    };
    let public = field(access, "public").and_then(|value| value.as_bool()).unwrap_or(false);
    let roles: Vec<String> = match field(access, "roles") {
        Some(Value::List(values)) => values.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    match (public, roles.is_empty()) {
        (true, true) => Ok(Rule::Public),
        (true, false) => Err(invalid("is both public and restricted to roles")),
        (false, true) => Err(invalid("has neither `public: true` nor a role")),
        (false, false) if roles.iter().any(|role| role.trim().is_empty()) => Err(invalid("names a blank role")),
        (false, false) => Ok(Rule::Roles(roles)),
    }
}

fn field(message: &DynamicMessage, name: &str) -> Option<Value> {
    message.get_field_by_name(name).map(|value| value.into_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

    use super::*;

    const AUTH_PROTO: &str = "eventfold/auth/v1/auth.proto";

    /// Proto sources by file name, for protox.
    struct Sources(HashMap<String, String>);

    impl FileResolver for Sources {
        fn open_file(&self, name: &str) -> Result<File, protox::Error> {
            match self.0.get(name) {
                Some(source) => File::from_source(name, source),
                None => Err(protox::Error::file_not_found(name)),
            }
        }
    }

    /// The encoded descriptor set of the file `name` with `source` (it may
    /// import the real auth.proto), with its imports.
    fn descriptor_set(name: &str, source: &str) -> Vec<u8> {
        let auth = include_str!("../../../../proto/eventfold/auth/v1/auth.proto");
        let sources =
            Sources(HashMap::from([(AUTH_PROTO.to_owned(), auth.to_owned()), (name.to_owned(), source.to_owned())]));
        let mut resolver = ChainFileResolver::new();
        resolver.add(sources);
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        compiler.open_file(name).unwrap();
        compiler.encode_file_descriptor_set()
    }

    /// A service in `package` with the RPC `Call` whose options are `options`
    /// and the RPC `Other` open to `t.read`.
    fn service(package: &str, options: &str) -> Vec<u8> {
        let name = format!("{}/service.proto", package.replace('.', "/"));
        descriptor_set(
            &name,
            &format!(
                r#"syntax = "proto3";
            package {package};
            import "{AUTH_PROTO}";
            message M {{}}
            service TService {{
              rpc Call(M) returns (M) {{ {options} }}
              rpc Other(M) returns (M) {{ option (eventfold.auth.v1.access) = {{roles: ["t.read"]}}; }}
            }}"#
            ),
        )
    }

    fn roles(roles: &[&str]) -> Vec<String> {
        roles.iter().map(|role| (*role).to_owned()).collect()
    }

    fn policy(package: &str, options: &str) -> Result<Policy, PolicyError> {
        Policy::from_descriptor_sets(&[&service(package, options)])
    }

    #[test]
    fn rules_are_found_by_grpc_path() {
        let policy =
            policy("eventfold.t.v1", r#"option (eventfold.auth.v1.access) = {roles: ["t.write", "t.operate"]};"#)
                .unwrap();
        assert_eq!(policy.rule("/eventfold.t.v1.TService/Call"), Some(&Rule::Roles(roles(&["t.write", "t.operate"]))));
        assert_eq!(policy.rule("/eventfold.t.v1.TService/Other"), Some(&Rule::Roles(roles(&["t.read"]))));
        assert_eq!(policy.rule("/eventfold.t.v1.TService/Unknown"), None);
        assert_eq!(policy.rule("eventfold.t.v1.TService.Call"), None, "a gRPC path, not a full name");
        let paths: Vec<&str> = policy.rules().map(|(path, _)| path).collect();
        assert_eq!(paths, ["/eventfold.t.v1.TService/Call", "/eventfold.t.v1.TService/Other"]);
    }

    #[test]
    fn a_role_allows_only_its_rpcs_and_admin_allows_all() {
        let rule = Rule::Roles(roles(&["orders.write", "orders.operate"]));
        assert!(rule.allows(&roles(&["orders.write"])));
        assert!(rule.allows(&roles(&["orders.read", "orders.operate"])), "any one of the roles");
        assert!(!rule.allows(&roles(&["orders.read"])));
        assert!(!rule.allows(&roles(&["orders.writer", "Orders.write", "admins"])), "exact names only");
        assert!(!rule.allows(&[]));
        assert!(rule.allows(&roles(&["admin"])));
        assert!(Rule::Roles(roles(&["admin"])).allows(&roles(&["admin"])));
        assert!(!Rule::Roles(roles(&["admin"])).allows(&roles(&["orders.write"])));
    }

    #[test]
    fn a_public_rpc_needs_no_role() {
        let policy = policy("eventfold.t.v1", "option (eventfold.auth.v1.access) = {public: true};").unwrap();
        let rule = policy.rule("/eventfold.t.v1.TService/Call").unwrap();
        assert_eq!(rule, &Rule::Public);
        assert!(rule.allows(&[]));
        assert!(rule.allows(&roles(&["anything"])));
    }

    #[test]
    fn an_eventfold_rpc_without_a_rule_is_refused_by_name() {
        let error = policy("eventfold.t.v1", "").unwrap_err();
        assert!(matches!(&error, PolicyError::Missing { rpc } if rpc == "eventfold.t.v1.TService.Call"), "{error:?}");
        assert!(error.to_string().contains("eventfold.t.v1.TService.Call"), "{error}");

        for (options, problem) in [
            ("option (eventfold.auth.v1.access) = {};", "neither"),
            ("option (eventfold.auth.v1.access) = {public: false};", "neither"),
            (r#"option (eventfold.auth.v1.access) = {public: true, roles: ["t.read"]};"#, "both public"),
            (r#"option (eventfold.auth.v1.access) = {roles: ["t.read", " "]};"#, "blank role"),
        ] {
            let error = policy("eventfold.t.v1", options).unwrap_err();
            assert!(matches!(&error, PolicyError::Invalid { rpc, .. } if rpc == "eventfold.t.v1.TService.Call"));
            assert!(error.to_string().contains(problem), "{options}: {error}");
        }
    }

    #[test]
    fn without_auth_proto_every_eventfold_rpc_is_missing_its_rule() {
        let set = descriptor_set(
            "eventfold/t/v1/bare.proto",
            r#"syntax = "proto3";
            package eventfold.t.v1;
            message M {}
            service TService { rpc Call(M) returns (M); }"#,
        );
        let error = Policy::from_descriptor_sets(&[&set]).unwrap_err();
        assert!(matches!(&error, PolicyError::Missing { rpc } if rpc == "eventfold.t.v1.TService.Call"), "{error:?}");
    }

    #[test]
    fn other_packages_are_not_governed() {
        let health = policy("grpc.health.v1", "").unwrap();
        assert_eq!(health.rules().count(), 0);
        assert_eq!(health.rule("/grpc.health.v1.TService/Call"), None);
        // `eventfoldx` is not an `eventfold.*` package.
        assert!(policy("eventfoldx.t.v1", "").is_ok());
    }

    #[test]
    fn sets_are_merged_and_shared_files_read_once() {
        let first = service("eventfold.a.v1", "option (eventfold.auth.v1.access) = {public: true};");
        let second = service("eventfold.b.v1", r#"option (eventfold.auth.v1.access) = {roles: ["b.write"]};"#);
        let policy = Policy::from_descriptor_sets(&[&first, &second, eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
        assert_eq!(policy.rule("/eventfold.a.v1.TService/Call"), Some(&Rule::Public));
        assert_eq!(policy.rule("/eventfold.b.v1.TService/Call"), Some(&Rule::Roles(roles(&["b.write"]))));
        assert!(policy.rule("/eventfold.orders.v1.OrderCommandService/CreateOrder").is_some());
        assert!(matches!(Policy::from_descriptor_sets(&[b"\xff\xff"]), Err(PolicyError::Decode(_))));
    }

    /// The catalog itself: every RPC of every eventfold service declares who
    /// may call it (a new RPC without the option fails here, by name).
    #[test]
    fn every_rpc_of_the_catalog_has_a_rule() {
        let policy = match Policy::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]) {
            Ok(policy) => policy,
            Err(error) => panic!("{error}"),
        };
        let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
        let extension = pool.get_extension_by_name(ACCESS_EXTENSION).expect("auth.proto is in the catalog");
        let mut governed = 0usize;
        for service in pool.services().filter(|s| s.package_name().starts_with(GOVERNED_PACKAGE_PREFIX)) {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(method.options().has_extension(&extension), "{path} has no ({ACCESS_EXTENSION}) option");
                assert!(policy.rule(&path).is_some(), "{path} has no rule");
                governed += 1;
            }
        }
        assert_eq!(policy.rules().count(), governed);
        assert!(governed >= 56, "{governed} RPCs");

        // A few rules of the reference role set.
        let rule = |path: &str| policy.rule(path).unwrap().clone();
        assert_eq!(rule("/eventfold.orders.v1.OrderCommandService/CreateOrder"), Rule::Roles(roles(&["orders.write"])));
        assert_eq!(rule("/eventfold.query.v1.OrderQueryService/GetOrder"), Rule::Roles(roles(&["orders.read"])));
        assert_eq!(
            rule("/eventfold.eventstore.v1.EventStoreService/Append"),
            Rule::Roles(roles(&["eventstore.write"]))
        );
        assert_eq!(
            rule("/eventfold.eventstore.v1.EventStoreService/ReadAll"),
            Rule::Roles(roles(&["eventstore.read"]))
        );
        assert_eq!(rule("/eventfold.eventstore.v1.EventStoreService/DeleteStream"), Rule::Roles(roles(&["admin"])));
        assert_eq!(rule("/eventfold.sagas.v1.SagaService/AbortSaga"), Rule::Roles(roles(&["sagas.operate"])));
        // Only roles of the documented set are used.
        let known = [
            "admin",
            "eventstore.read",
            "eventstore.write",
            "orders.read",
            "orders.write",
            "inventory.read",
            "inventory.write",
            "payments.write",
            "shipping.write",
            "accounts.read",
            "accounts.write",
            "users.read",
            "users.write",
            "sagas.read",
            "sagas.operate",
            "topics.read",
            "topics.write",
            "topics.admin",
        ];
        for (path, rule) in policy.rules() {
            if let Rule::Roles(roles) = rule {
                assert!(roles.iter().all(|role| known.contains(&role.as_str())), "{path}: {roles:?}");
            }
        }
    }
}
