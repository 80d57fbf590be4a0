//! `eventfold-bench auth`: what the authentication layer adds to a call.
//!
//! One process runs the command services three times, each on a gRPC server
//! of its own on a loopback port, over the same event store (one event log,
//! one command bus) and with nothing limited:
//!
//! - **auth off**: `authenticate(config, false, None)`;
//! - **auth on**, twice, configured alike (an HS256 secret and the API key
//!   store of the bench's database), and called with different credentials:
//!   - **JWT HS256**: `authorization: Bearer …`, a token minted once with
//!     the roles CreateOrder needs (read from its `(eventfold.auth.v1.access)`
//!     option);
//!   - **API key (cached)**: `x-api-key: …`, a key created in the database
//!     with those roles; the store's cache is warm after the warm-up.
//!
//! CreateOrder then goes to each at the same open-loop rate, in blocks of
//! the same length, the order of the three rotated every round, so that a
//! drift of the machine hits all three alike; or, with `--interleave`, in
//! one stream whose calls go to the three in turn, so that even a stall
//! shorter than a block does. The layer's cost is each auth-on p99 minus
//! the auth-off p99, against [`MAX_P99_COST_MS`], with an interval from
//! resampling the rounds. `--control` runs all three with authentication
//! off: what the bench reports between identical servers.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use eventfold_platform::{
    auth::{
        API_KEY_HEADER, AuthConfig, Authenticator, KeyVerifier, Secret,
        keys::ApiKeyStore,
        policy::{Policy, Rule},
    },
    runtime::CancellationToken,
};
use eventfold_proto::orders::{
    order_command_service_client::OrderCommandServiceClient, order_command_service_server::SERVICE_NAME,
};
use tonic::{
    Code,
    metadata::{Ascii, AsciiMetadataValue, MetadataKey},
    transport::Channel,
};
use uuid::Uuid;

use crate::{
    append::thousands,
    pacing::{Arm, Rounds, Schedule, compare, create_order_request, delete_orders, serve_commands},
    queries::ReadSide,
};

/// Issue 17's target: the layer adds at most this much to CreateOrder's
/// p99 at 500/s, with a JWT and with a cached API key.
pub(crate) const MAX_P99_COST_MS: f64 = 0.3;
/// Checks of the in-process measurement of the layer's own time.
const LAYER_CHECKS: u32 = 20_000;

/// Arguments of `eventfold-bench auth`.
#[derive(Debug, clap::Args)]
pub(crate) struct AuthBenchArgs {
    /// PostgreSQL URL of a throw-away database (migrated; orders `abench-…`
    /// and one API key are created in it, and deleted again).
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,

    #[command(flatten)]
    schedule: Schedule,

    #[command(flatten)]
    rounds: Rounds,

    /// Calibration (an A/A run): all three servers with authentication off
    /// and no credentials sent, so every difference shown is the bench's
    /// own (the variants keep their names).
    #[arg(long)]
    control: bool,
}

/// How a call authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Off,
    Jwt,
    ApiKey,
}

const VARIANTS: [Variant; 3] = [Variant::Off, Variant::Jwt, Variant::ApiKey];

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Self::Off => "auth off",
            Self::Jwt => "JWT HS256",
            Self::ApiKey => "API key (cached)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Off => "o",
            Self::Jwt => "j",
            Self::ApiKey => "k",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn arm(self) -> Arm {
        Arm { label: self.label(), tag: self.tag() }
    }
}

/// A server's client and the credentials its calls carry.
#[derive(Clone)]
struct Target {
    client: OrderCommandServiceClient<Channel>,
    credentials: Option<Header>,
}

/// A header of credentials.
type Header = (MetadataKey<Ascii>, AsciiMetadataValue);

impl Target {
    /// CreateOrder `order_id`, with the target's credentials unless `bare`.
    fn create_order(
        &self,
        order_id: String,
        i: usize,
        bare: bool,
    ) -> impl Future<Output = Result<(), tonic::Status>> + use<> {
        let mut request = tonic::Request::new(create_order_request(order_id, i));
        if let (Some((name, value)), false) = (&self.credentials, bare) {
            request.metadata_mut().insert(name.clone(), value.clone());
        }
        let mut client = self.client.clone();
        async move { client.create_order(request).await.map(drop) }
    }
}

/// The credentials of the two auth-on variants, and what checks them.
struct Credentials {
    config: AuthConfig,
    keys: ApiKeyStore,
    token: String,
    key: Secret,
    key_id: Uuid,
}

impl Credentials {
    /// An HS256 secret and a token of `roles`, and an API key of `roles`
    /// created in the database of `keys`.
    async fn new(keys: ApiKeyStore, session: &str, roles: &[String]) -> anyhow::Result<Self> {
        let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        let mut config = AuthConfig { enabled: Some(true), ..AuthConfig::default() };
        config.jwt.hs256_secret = Some(Secret::new(secret.clone()));
        let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
        let claims = serde_json::json!({"sub": format!("abench-{session}"), "roles": roles, "exp": exp});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .context("minting the JWT")?;
        let created = keys.create(&format!("abench-{session}"), roles).await.context("creating the API key")?;
        Ok(Self { config, keys, token, key: created.key, key_id: created.api_key.id })
    }

    fn header(&self, variant: Variant) -> anyhow::Result<Option<Header>> {
        Ok(match variant {
            Variant::Off => None,
            Variant::Jwt => {
                Some((MetadataKey::from_static("authorization"), format!("Bearer {}", self.token).parse()?))
            }
            Variant::ApiKey => Some((MetadataKey::from_static(API_KEY_HEADER), self.key.expose().parse()?)),
        })
    }

    fn verifier(&self) -> Arc<dyn KeyVerifier> {
        Arc::new(self.keys.clone())
    }
}

/// The roles that may call CreateOrder, as its proto option says.
fn create_order_roles(policy: &Policy) -> anyhow::Result<Vec<String>> {
    match policy.rule(&create_order_path()) {
        Some(Rule::Roles(roles)) if !roles.is_empty() => Ok(roles.clone()),
        other => bail!("CreateOrder's (eventfold.auth.v1.access) is not a list of roles: {other:?}"),
    }
}

fn create_order_path() -> String {
    format!("/{SERVICE_NAME}/CreateOrder")
}

pub(crate) async fn auth(args: AuthBenchArgs) -> anyhow::Result<()> {
    let ReadSide { admin, machine, database, log, .. } = ReadSide::open(&args.database_url).await?;
    let session = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let policy = Policy::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET])?;
    let roles = create_order_roles(&policy)?;
    // API keys are looked up in the event store's database, as `serve` does.
    let credentials = Credentials::new(ApiKeyStore::new(database), &session, &roles).await?;

    let stop = CancellationToken::new();
    let bus = eventfold_command::bus(log.clone(), eventfold_command::Config::default().bus_options());
    let mut servers = Vec::new();
    let mut targets = Vec::new();
    for variant in VARIANTS {
        let as_run = if args.control { Variant::Off } else { variant };
        let (channel, server) = serve_commands(&log, &bus, &stop, |server| {
            match as_run {
                Variant::Off => server.authenticate(&AuthConfig::default(), false, None),
                Variant::Jwt | Variant::ApiKey => {
                    server.authenticate(&credentials.config, true, Some(credentials.verifier()))
                }
            };
        })
        .await?;
        servers.push(server);
        targets
            .push(Target { client: OrderCommandServiceClient::new(channel), credentials: credentials.header(as_run)? });
    }

    let result = async {
        measure(&args, &machine, &targets, &session).await?;
        let [jwt, key] = layer_time(&credentials, policy).await?;
        println!(
            "The check alone, in-process (`Authenticator::check` of a CreateOrder call, {} calls one after \
             another, after the blocks): {} µs per call with the JWT, {} µs with the cached API key (mean).",
            thousands(f64::from(LAYER_CHECKS)),
            micros(jwt),
            micros(key)
        );
        anyhow::Ok(())
    }
    .await;

    stop.cancel();
    for server in servers {
        let _ = server.await;
    }
    let cleanup = async {
        delete_orders(&admin, &format!("order-abench-{session}-%")).await?;
        admin
            .execute("DELETE FROM auth.api_keys WHERE id = $1", &[&credentials.key_id])
            .await
            .context("deleting the bench's API key")?;
        anyhow::Ok(())
    };
    result.and(cleanup.await)
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// The blocks and the tables.
async fn measure(args: &AuthBenchArgs, machine: &str, targets: &[Target], session: &str) -> anyhow::Result<()> {
    // Authentication is really on where it should be: a call without
    // credentials is refused there, and answered on the auth-off server.
    for variant in VARIANTS {
        let target = &targets[variant.index()];
        let bare = target.create_order(format!("abench-{session}-b{}", variant.tag()), 0, true).await;
        match (variant, bare) {
            (_, Ok(())) if args.control => {}
            (Variant::Off, Ok(())) => {}
            (Variant::Jwt | Variant::ApiKey, Err(status)) if status.code() == Code::Unauthenticated => {}
            (_, other) => bail!("{}: a call without credentials was answered {other:?}", variant.label()),
        }
    }
    let targets = targets.to_vec();
    let comparison = compare(
        &args.schedule,
        &args.rounds,
        VARIANTS.map(Variant::arm),
        &format!("abench-{session}"),
        move |arm, id, i| {
            let call = targets[arm].create_order(id, i, false);
            async move { call.await.map_err(anyhow::Error::from) }
        },
    )
    .await?;

    println!("{machine}");
    println!();
    println!(
        "CreateOrder over gRPC, open loop at {}/s, to three servers hosting the same command services over one \
         event store: auth off, auth on with an HS256 JWT, auth on with an API key (cached); {}; latency from the \
         scheduled send time. One tonic channel per server; no rate limits.",
        args.schedule.rate,
        args.rounds.describe(&args.schedule, VARIANTS.len())
    );
    if args.control {
        println!();
        println!(
            "CONTROL RUN (--control): all three servers have authentication off and no call carries credentials; \
             the variants keep their names only to show what the bench reports between identical servers."
        );
    }
    println!();
    comparison.print_arms();
    println!();
    comparison.print_costs(
        Variant::Off.index(),
        &[(Variant::Jwt.index(), true), (Variant::ApiKey.index(), true)],
        MAX_P99_COST_MS,
        args.rounds.rounds,
    );
    Ok(())
}

/// The mean time of `Authenticator::check` on a CreateOrder call with the
/// JWT and with the (cached) API key, one call after another: the layer's
/// own work, without the network, the server or the store.
async fn layer_time(credentials: &Credentials, policy: Policy) -> anyhow::Result<[Duration; 2]> {
    let authenticator = Authenticator::new(&credentials.config, policy, Some(credentials.verifier()))?;
    let path = create_order_path();
    let mut times = [Duration::ZERO; 2];
    for (time, variant) in times.iter_mut().zip([Variant::Jwt, Variant::ApiKey]) {
        let (name, value) = credentials.header(variant)?.context("credentials")?;
        let mut headers = http::HeaderMap::new();
        headers.insert(http::HeaderName::from_bytes(name.as_str().as_bytes())?, value.to_str()?.parse()?);
        // Once to fill the key cache, then timed.
        authenticator.check(&path, &headers).await?;
        let started = Instant::now();
        for _ in 0..LAYER_CHECKS {
            if authenticator.check(&path, &headers).await?.is_none() {
                bail!("{}: the check let the call through without a principal", variant.label());
            }
        }
        *time = started.elapsed() / LAYER_CHECKS;
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_order_needs_a_role_read_from_its_proto_option() {
        let policy = Policy::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
        let roles = create_order_roles(&policy).unwrap();
        assert!(roles.contains(&"orders.write".to_owned()), "{roles:?}");
        assert_eq!(create_order_path(), "/eventfold.orders.v1.OrderCommandService/CreateOrder");
    }

    #[test]
    fn each_variant_has_its_own_tag() {
        let tags: std::collections::BTreeSet<_> = VARIANTS.iter().map(|v| v.tag()).collect();
        assert_eq!(tags.len(), VARIANTS.len());
        assert_eq!(VARIANTS.map(Variant::index), [0, 1, 2]);
    }
}
