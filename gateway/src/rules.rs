//! The HTTP bindings of the RPCs, read from their `google.api.http`
//! options in the descriptor set: one [`Binding`] per rule and per
//! additional binding.

use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MethodDescriptor, Value};

use crate::template::{PathTemplate, TemplateError};

/// The extension that carries an RPC's HTTP rule.
const HTTP_EXTENSION: &str = "google.api.http";

/// Where a request's body goes.
#[derive(Debug, Clone)]
pub enum Body {
    /// No body: every field not bound by the path is a query parameter.
    None,
    /// `body: "*"`: the body is the whole request message (minus the path
    /// fields); no query parameters.
    All,
    /// `body: "field"`: the body is this top-level field.
    Field(FieldDescriptor),
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Binding {
    pub rpc: MethodDescriptor,
    pub method: http::Method,
    pub template: PathTemplate,
    pub body: Body,
    /// `response_body`: the answer is this field of the response.
    pub response_body: Option<FieldDescriptor>,
}

impl Binding {
    /// `Service_Method` (the OpenAPI operation id).
    pub fn operation_id(&self) -> String {
        format!("{}_{}", self.rpc.parent_service().name(), self.rpc.name())
    }

    /// Whether the RPC streams its answers.
    pub fn server_streaming(&self) -> bool {
        self.rpc.is_server_streaming()
    }
}

/// A rule that cannot be served: the descriptor set is wrong, which is a
/// build mistake, not a request's.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{rpc}: path template {template:?}: {source}")]
    Template { rpc: String, template: String, source: TemplateError },
    #[error("{rpc}: {message}")]
    Invalid { rpc: String, message: String },
}

/// Every binding of every RPC in `pool` that has a `google.api.http` rule,
/// most specific template first (the order a router tries them in).
///
/// # Errors
///
/// A rule that does not parse, or names a field the request lacks.
pub fn bindings(pool: &DescriptorPool) -> Result<Vec<Binding>, RuleError> {
    let Some(extension) = pool.get_extension_by_name(HTTP_EXTENSION) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for service in pool.services() {
        for rpc in service.methods() {
            let options = rpc.options();
            if !options.has_extension(&extension) {
                continue;
            }
            let Value::Message(rule) = options.get_extension(&extension).into_owned() else {
                continue;
            };
            read_rule(&rpc, &rule, true, &mut out)?;
        }
    }
    out.sort_by_key(|b| b.template.specificity());
    Ok(out)
}

fn read_rule(
    rpc: &MethodDescriptor,
    rule: &DynamicMessage,
    top: bool,
    out: &mut Vec<Binding>,
) -> Result<(), RuleError> {
    let invalid = |message: String| RuleError::Invalid { rpc: rpc.full_name().to_owned(), message };
    let text = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let pattern = [
        ("get", http::Method::GET),
        ("put", http::Method::PUT),
        ("post", http::Method::POST),
        ("delete", http::Method::DELETE),
        ("patch", http::Method::PATCH),
    ]
    .into_iter()
    .find_map(|(name, method)| text(name).map(|path| (method, path)));
    let pattern = match pattern {
        Some(found) => Some(found),
        None => match rule.get_field_by_name("custom").as_deref() {
            Some(Value::Message(custom)) => {
                let kind = match custom.get_field_by_name("kind").as_deref() {
                    Some(Value::String(kind)) => kind.clone(),
                    _ => String::new(),
                };
                let path = match custom.get_field_by_name("path").as_deref() {
                    Some(Value::String(path)) => path.clone(),
                    _ => String::new(),
                };
                let method = http::Method::from_bytes(kind.as_bytes())
                    .map_err(|_| invalid(format!("custom method {kind:?} is not an HTTP method")))?;
                (!path.is_empty()).then_some((method, path))
            }
            _ => None,
        },
    };
    let Some((method, path)) = pattern else {
        return Err(invalid("an HTTP rule without a pattern".to_owned()));
    };
    let template = PathTemplate::parse(&path).map_err(|source| RuleError::Template {
        rpc: rpc.full_name().to_owned(),
        template: path.clone(),
        source,
    })?;
    let input = rpc.input();
    for variable in template.variables() {
        let field = field_path(&input, variable)
            .ok_or_else(|| invalid(format!("path variable {variable:?} is not a field of {}", input.full_name())))?;
        if field.is_list() || field.is_map() || matches!(field.kind(), Kind::Message(_)) {
            return Err(invalid(format!("path variable {variable:?} is not a singular scalar field")));
        }
    }
    let body = match text("body").as_deref() {
        None => Body::None,
        Some("*") => Body::All,
        Some(name) => Body::Field(
            input
                .get_field_by_name(name)
                .ok_or_else(|| invalid(format!("body {name:?} is not a field of {}", input.full_name())))?,
        ),
    };
    let response_body = match text("response_body") {
        None => None,
        Some(name) => Some(rpc.output().get_field_by_name(&name).ok_or_else(|| {
            invalid(format!("response_body {name:?} is not a field of {}", rpc.output().full_name()))
        })?),
    };
    out.push(Binding { rpc: rpc.clone(), method, template, body, response_body });
    if top && let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref() {
        for binding in more {
            if let Value::Message(binding) = binding {
                // Additional bindings do not nest (http.proto).
                read_rule(rpc, binding, false, out)?;
            }
        }
    }
    Ok(())
}

/// The field a dotted path (`order.id`) names, through singular message
/// fields.
pub fn field_path(message: &prost_reflect::MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current.get_field_by_name(part).or_else(|| current.get_field_by_json_name(part))?;
        if parts.peek().is_none() {
            return Some(field);
        }
        match field.kind() {
            Kind::Message(inner) if !field.is_list() && !field.is_map() => current = inner,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_annotated_rpc_of_eventfold_has_a_binding() {
        let pool = DescriptorPool::decode(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
        let bindings = bindings(&pool).unwrap();
        let annotated: usize = pool
            .services()
            .flat_map(|s| s.methods().collect::<Vec<_>>())
            .filter(|m| m.options().has_extension(&pool.get_extension_by_name(HTTP_EXTENSION).unwrap()))
            .count();
        assert!(annotated >= 56, "{annotated} annotated RPCs");
        assert_eq!(bindings.len(), annotated, "one binding each (no additional bindings in proto/ yet)");
        let confirm = bindings.iter().find(|b| b.operation_id() == "OrderCommandService_ConfirmOrder").unwrap();
        assert_eq!(confirm.method, http::Method::POST);
        assert_eq!(confirm.template.to_string(), "/v1/orders/{order_id}:confirm");
        assert!(matches!(confirm.body, Body::All));
        // A verb template comes before the plain variable one of the same path.
        let position = |id: &str| bindings.iter().position(|b| b.operation_id() == id).unwrap();
        assert!(position("OrderQueryService_GetOrderAt") < position("OrderQueryService_GetOrder"));
    }
}
