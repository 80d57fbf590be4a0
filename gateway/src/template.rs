//! `google.api.http` path templates: parsing, matching request paths and
//! extracting the variables they bind.
//!
//! The grammar is the one documented in `google/api/http.proto`:
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `{var}` is shorthand for `{var=*}`. `**` matches zero or more segments and
//! may only be the last segment of the template (possibly inside the last
//! variable). A `*` or `**` outside a variable matches without binding.
//!
//! Values are percent-decoded. A variable that matches a single segment is
//! fully decoded (`%2F` becomes `/`); a variable that spans several segments
//! keeps `%2F` encoded so the `/` that separates segments stays
//! distinguishable from an escaped one ("reserved expansion").

use std::cmp::Reverse;
use std::fmt;

/// Why a path template was refused. Every variant names the template and,
/// where there is one, the byte offset of the problem.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("path template is empty; it must start with '/'")]
    Empty,
    #[error("path template `{template}` must start with '/'")]
    MissingLeadingSlash { template: String },
    #[error("path template `{template}`: empty segment at byte {position} (segments between '/' must not be empty)")]
    EmptySegment { template: String, position: usize },
    #[error("path template `{template}`: unexpected {found:?} at byte {position}, expected {expected}")]
    UnexpectedChar { template: String, position: usize, found: char, expected: &'static str },
    #[error("path template `{template}`: the variable opened at byte {position} is never closed with '}}'")]
    UnclosedVariable { template: String, position: usize },
    #[error("path template `{template}`: '}}' at byte {position} does not close any variable")]
    UnmatchedCloseBrace { template: String, position: usize },
    #[error("path template `{template}`: variable at byte {position} is nested inside another variable")]
    NestedVariable { template: String, position: usize },
    #[error("path template `{template}`: the variable at byte {position} has no field name")]
    EmptyVariableName { template: String, position: usize },
    #[error("path template `{template}`: invalid field path at byte {position}: {reason}")]
    InvalidFieldPath { template: String, position: usize, reason: &'static str },
    #[error("path template `{template}`: `**` at byte {position} must be the last segment of the template")]
    DoubleWildcardNotLast { template: String, position: usize },
    #[error("path template `{template}`: the verb after ':' at byte {position} is empty")]
    EmptyVerb { template: String, position: usize },
    #[error("path template `{template}`: '%' at byte {position} is not followed by two hexadecimal digits")]
    InvalidPercentEncoding { template: String, position: usize },
    #[error("path template `{template}`: field `{field_path}` is bound by more than one variable")]
    DuplicateVariable { template: String, field_path: String },
}

/// One segment of the template (variables are recorded separately, as
/// ranges over these segments).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Segment {
    /// A literal, as written in the template and percent-decoded.
    Literal { raw: String, decoded: Vec<u8> },
    /// `*`: exactly one non-empty segment.
    Wildcard,
    /// `**`: zero or more non-empty segments (only ever the last segment).
    DeepWildcard,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Variable {
    field_path: String,
    /// Range of template segments the variable covers.
    start: usize,
    end: usize,
    /// Spans several segments (or `**`): the value keeps `%2F` encoded.
    multi_segment: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Verb {
    raw: String,
    decoded: Vec<u8>,
}

/// A parsed `google.api.http` path template.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<Verb>,
}

impl PathTemplate {
    /// Parses a template such as `/v1/{name=shelves/*/books/*}:publish`.
    pub fn parse(template: &str) -> Result<PathTemplate, TemplateError> {
        Parser::new(template).parse()
    }

    /// The field paths bound by variables, in order (e.g. `["order_id"]`, `["order.id"]`).
    pub fn variables(&self) -> Vec<&str> {
        self.variables.iter().map(|v| v.field_path.as_str()).collect()
    }

    /// The custom verb (`confirm` in `/v1/orders/{order_id}:confirm`), if any.
    pub fn verb(&self) -> Option<&str> {
        self.verb.as_ref().map(|v| v.raw.as_str())
    }

    /// Matches a request path (the raw, still percent-encoded path of the URI,
    /// without the query). Returns the bindings `(field path, value)` in
    /// order, values percent-decoded: a single-segment variable decodes `%2F`
    /// too; a multi-segment variable is the matched segments joined by `/`
    /// with `%2F` left encoded. `None` if the path does not match, or if a
    /// decoded value is not valid UTF-8.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let rest = path.strip_prefix('/')?;
        let mut parts: Vec<&str> = rest.split('/').collect();
        if let Some(verb) = &self.verb {
            let last = parts.last_mut()?;
            let (head, tail) = last.rsplit_once(':')?;
            if percent_decode(tail, false) != verb.decoded {
                return None;
            }
            *last = head;
        }

        let deep = matches!(self.segments.last(), Some(Segment::DeepWildcard));
        let fixed = if deep { self.segments.len().saturating_sub(1) } else { self.segments.len() };
        if parts.len() < fixed || (!deep && parts.len() != fixed) {
            return None;
        }
        // Empty segments (`//`, a trailing '/') never match anything.
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let fixed_ok = self.segments.iter().zip(parts.iter()).take(fixed).all(|(segment, part)| match segment {
            Segment::Literal { decoded, .. } => percent_decode(part, false) == *decoded,
            Segment::Wildcard | Segment::DeepWildcard => true,
        });
        if !fixed_ok {
            return None;
        }

        let mut bindings = Vec::with_capacity(self.variables.len());
        for variable in &self.variables {
            let end = if deep && variable.end == self.segments.len() { parts.len() } else { variable.end };
            let matched = parts.get(variable.start..end)?;
            let bytes = if variable.multi_segment {
                percent_decode(&matched.join("/"), true)
            } else {
                percent_decode(matched.first()?, false)
            };
            let value = String::from_utf8(bytes).ok()?;
            bindings.push((variable.field_path.clone(), value));
        }
        Some(bindings)
    }

    /// Ordering key so that a router tries more specific templates first:
    /// sorting templates by this key in ascending order (e.g.
    /// `templates.sort_by_key(PathTemplate::specificity)`) puts the most
    /// specific first. More literal segments first, then a verb before no
    /// verb, then templates without `**` before those with one, then fewer
    /// wildcards.
    ///
    /// Among templates without `**` that can match the same path (same number
    /// of segments), equal literal counts imply equal wildcard counts, so this
    /// is "literals, then wildcards, then verb". `**` ranks below `*` because
    /// it matches any number of segments: `/v1/{name=**}` must not shadow
    /// `/v1/{a}/{b}`, while `/v1/{name=**}:get` should win over `/v1/{a}/{b}`
    /// for `/v1/p/q:get`.
    pub fn specificity(&self) -> impl Ord + use<> {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal { .. })).count();
        let wildcards = self.segments.iter().filter(|s| !matches!(s, Segment::Literal { .. })).count();
        let deep = self.segments.iter().filter(|s| matches!(s, Segment::DeepWildcard)).count();
        (Reverse(literals), self.verb.is_none(), deep, wildcards)
    }

    /// The template as an OpenAPI path, e.g. `/v1/orders/{order_id}:confirm`:
    /// every variable (single- or multi-segment) becomes `{field.path}`.
    /// A `*`/`**` outside a variable binds nothing and stays as written.
    pub fn openapi_path(&self) -> String {
        let mut out = String::with_capacity(self.text.len());
        for (index, segment) in self.segments.iter().enumerate() {
            if let Some(variable) = self.variables.iter().find(|v| v.start <= index && index < v.end) {
                if variable.start == index {
                    out.push('/');
                    out.push('{');
                    out.push_str(&variable.field_path);
                    out.push('}');
                }
                continue;
            }
            out.push('/');
            match segment {
                Segment::Literal { raw, .. } => out.push_str(raw),
                Segment::Wildcard => out.push('*'),
                Segment::DeepWildcard => out.push_str("**"),
            }
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(&verb.raw);
        }
        out
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PathTemplate").field(&self.text).finish()
    }
}

/// Characters allowed in a literal (segment or verb): RFC 3986 `pchar`
/// without the ones the template grammar reserves (`:`, `*`, `=`, braces,
/// `/`). `%` must start a percent-encoded octet.
fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '-' | '.' | '_' | '~' | '!' | '$' | '&' | '\'' | '(' | ')' | '+' | ',' | ';' | '@' | '%')
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Percent-decodes `s`. With `keep_slash`, `%2F`/`%2f` stays as written.
/// A '%' not followed by two hex digits is kept as is.
fn percent_decode(s: &str, keep_slash: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%'
            && let [h, l, after @ ..] = tail
            && let (Some(hi), Some(lo)) = (hex_value(*h), hex_value(*l))
        {
            // hi and lo are < 16: no overflow.
            let byte = hi.wrapping_mul(16).wrapping_add(lo);
            if keep_slash && byte == b'/' {
                out.extend_from_slice(&[b, *h, *l]);
            } else {
                out.push(byte);
            }
            rest = after;
            continue;
        }
        out.push(b);
        rest = tail;
    }
    out
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    segments: Vec<Segment>,
    /// Byte offset of each segment, for error messages.
    positions: Vec<usize>,
    variables: Vec<Variable>,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser { src, pos: 0, segments: Vec::new(), positions: Vec::new(), variables: Vec::new() }
    }

    fn peek(&self) -> Option<char> {
        self.src.get(self.pos..).and_then(|rest| rest.chars().next())
    }

    fn bump(&mut self) {
        if let Some(c) = self.peek() {
            self.pos = self.pos.saturating_add(c.len_utf8());
        }
    }

    fn template(&self) -> String {
        self.src.to_owned()
    }

    fn unexpected(&self, found: char, expected: &'static str) -> TemplateError {
        TemplateError::UnexpectedChar { template: self.template(), position: self.pos, found, expected }
    }

    fn push(&mut self, segment: Segment, position: usize) {
        self.segments.push(segment);
        self.positions.push(position);
    }

    fn parse(mut self) -> Result<PathTemplate, TemplateError> {
        if self.src.is_empty() {
            return Err(TemplateError::Empty);
        }
        if self.peek() != Some('/') {
            return Err(TemplateError::MissingLeadingSlash { template: self.template() });
        }
        self.bump();
        let mut verb = None;
        loop {
            self.segment(false)?;
            match self.peek() {
                Some('/') => self.bump(),
                Some(':') => {
                    self.bump();
                    verb = Some(self.verb()?);
                    break;
                }
                None => break,
                Some('}') => {
                    return Err(TemplateError::UnmatchedCloseBrace { template: self.template(), position: self.pos });
                }
                Some(c) => return Err(self.unexpected(c, "'/', ':' (a verb) or the end of the template")),
            }
        }

        let before_last = self.segments.len().saturating_sub(1);
        if let Some(index) = self.segments.iter().take(before_last).position(|s| matches!(s, Segment::DeepWildcard)) {
            let position = self.positions.get(index).copied().unwrap_or_default();
            return Err(TemplateError::DoubleWildcardNotLast { template: self.template(), position });
        }
        for (index, variable) in self.variables.iter().enumerate() {
            if self.variables.iter().take(index).any(|v| v.field_path == variable.field_path) {
                return Err(TemplateError::DuplicateVariable {
                    template: self.template(),
                    field_path: variable.field_path.clone(),
                });
            }
        }

        Ok(PathTemplate { text: self.template(), segments: self.segments, variables: self.variables, verb })
    }

    /// One segment; a variable is only allowed outside another variable.
    fn segment(&mut self, in_variable: bool) -> Result<(), TemplateError> {
        let start = self.pos;
        match self.peek() {
            Some('*') => {
                self.bump();
                if self.peek() == Some('*') {
                    self.bump();
                    self.push(Segment::DeepWildcard, start);
                } else {
                    self.push(Segment::Wildcard, start);
                }
                Ok(())
            }
            Some('{') if in_variable => {
                Err(TemplateError::NestedVariable { template: self.template(), position: start })
            }
            Some('{') => self.variable(),
            Some('}') if !in_variable => {
                Err(TemplateError::UnmatchedCloseBrace { template: self.template(), position: start })
            }
            None | Some('/' | ':' | '}') => {
                Err(TemplateError::EmptySegment { template: self.template(), position: start })
            }
            Some(_) => {
                let (raw, decoded) = self.literal("a literal, '*', '**' or a variable")?;
                self.push(Segment::Literal { raw, decoded }, start);
                Ok(())
            }
        }
    }

    /// A non-empty literal: returns it as written and percent-decoded.
    fn literal(&mut self, expected: &'static str) -> Result<(String, Vec<u8>), TemplateError> {
        let start = self.pos;
        while let Some(c) = self.peek()
            && is_literal_char(c)
        {
            if c == '%' {
                let octet = self.src.get(self.pos..).map(str::as_bytes).and_then(|rest| rest.get(1..3));
                let valid = matches!(octet, Some([h, l]) if hex_value(*h).is_some() && hex_value(*l).is_some());
                if !valid {
                    return Err(TemplateError::InvalidPercentEncoding {
                        template: self.template(),
                        position: self.pos,
                    });
                }
            }
            self.bump();
        }
        let raw = self.src.get(start..self.pos).unwrap_or_default();
        if raw.is_empty() {
            return Err(match self.peek() {
                Some(c) => self.unexpected(c, expected),
                None => TemplateError::EmptySegment { template: self.template(), position: start },
            });
        }
        Ok((raw.to_owned(), percent_decode(raw, false)))
    }

    fn verb(&mut self) -> Result<Verb, TemplateError> {
        let start = self.pos;
        if self.peek().is_none() {
            return Err(TemplateError::EmptyVerb { template: self.template(), position: start });
        }
        let (raw, decoded) = self.literal("a verb (a literal)")?;
        if let Some(c) = self.peek() {
            return Err(self.unexpected(c, "the end of the template (the verb must come last)"));
        }
        Ok(Verb { raw, decoded })
    }

    /// `{ FieldPath [ "=" Segments ] }`, the '{' not yet consumed.
    fn variable(&mut self) -> Result<(), TemplateError> {
        let open = self.pos;
        self.bump();
        let field_path = self.field_path(open)?;
        let start = self.segments.len();
        match self.peek() {
            Some('}') => {
                let position = self.pos;
                self.bump();
                self.push(Segment::Wildcard, position);
            }
            Some('=') => {
                self.bump();
                loop {
                    self.segment(true)?;
                    match self.peek() {
                        Some('/') => self.bump(),
                        Some('}') => {
                            self.bump();
                            break;
                        }
                        None => {
                            return Err(TemplateError::UnclosedVariable { template: self.template(), position: open });
                        }
                        Some('{') => {
                            return Err(TemplateError::NestedVariable {
                                template: self.template(),
                                position: self.pos,
                            });
                        }
                        Some(c) => return Err(self.unexpected(c, "'/' or '}' (the end of the variable)")),
                    }
                }
            }
            None => return Err(TemplateError::UnclosedVariable { template: self.template(), position: open }),
            Some('{') => return Err(TemplateError::NestedVariable { template: self.template(), position: self.pos }),
            Some(_) => {
                return Err(TemplateError::InvalidFieldPath {
                    template: self.template(),
                    position: self.pos,
                    reason: "an identifier may contain only ASCII letters, digits and '_'",
                });
            }
        }
        let end = self.segments.len();
        let covered = self.segments.get(start..end).unwrap_or_default();
        let multi_segment = !matches!(covered, [Segment::Wildcard | Segment::Literal { .. }]);
        self.variables.push(Variable { field_path, start, end, multi_segment });
        Ok(())
    }

    /// `IDENT { "." IDENT }`; stops before the first character that cannot
    /// continue it.
    fn field_path(&mut self, open: usize) -> Result<String, TemplateError> {
        let begin = self.pos;
        match self.peek() {
            Some('}' | '=') => {
                return Err(TemplateError::EmptyVariableName { template: self.template(), position: open });
            }
            None => return Err(TemplateError::UnclosedVariable { template: self.template(), position: open }),
            _ => {}
        }
        loop {
            match self.peek() {
                Some(c) if c.is_ascii_alphabetic() || c == '_' => self.bump(),
                Some('.' | '}' | '=') => {
                    return Err(TemplateError::InvalidFieldPath {
                        template: self.template(),
                        position: self.pos,
                        reason: "empty identifier (a '.' at the start or end, or two in a row)",
                    });
                }
                None => return Err(TemplateError::UnclosedVariable { template: self.template(), position: open }),
                Some('{') => {
                    return Err(TemplateError::NestedVariable { template: self.template(), position: self.pos });
                }
                Some(_) => {
                    return Err(TemplateError::InvalidFieldPath {
                        template: self.template(),
                        position: self.pos,
                        reason: "an identifier must start with an ASCII letter or '_'",
                    });
                }
            }
            while let Some(c) = self.peek()
                && (c.is_ascii_alphanumeric() || c == '_')
            {
                self.bump();
            }
            if self.peek() == Some('.') {
                self.bump();
            } else {
                break;
            }
        }
        Ok(self.src.get(begin..self.pos).unwrap_or_default().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(template: &str) -> PathTemplate {
        PathTemplate::parse(template).unwrap()
    }

    fn bind(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    fn err(template: &str) -> TemplateError {
        PathTemplate::parse(template).unwrap_err()
    }

    #[test]
    fn literal_template_matches_exactly() {
        let tpl = t("/v1/orders");
        assert!(tpl.variables().is_empty());
        assert_eq!(tpl.verb(), None);
        assert_eq!(tpl.matches("/v1/orders"), bind(&[]));
        assert_eq!(tpl.matches("/v1/orders/"), None, "trailing slash");
        assert_eq!(tpl.matches("/v1/orders/x"), None);
        assert_eq!(tpl.matches("/v1"), None);
        assert_eq!(tpl.matches("v1/orders"), None);
        assert_eq!(tpl.matches("/v1/Orders"), None, "literals are case-sensitive");
        assert_eq!(tpl.matches("/v1//orders"), None);
        assert_eq!(tpl.matches(""), None);
        // A percent-encoded request segment equal to the literal once decoded.
        assert_eq!(tpl.matches("/v1/%6Frders"), bind(&[]));
    }

    #[test]
    fn trailing_slash_in_path_does_not_match() {
        assert_eq!(t("/v1/orders/{id}").matches("/v1/orders/o-1/"), None);
        assert_eq!(t("/v1/orders").matches("/v1/orders/"), None);
    }

    #[test]
    fn simple_variable() {
        let tpl = t("/v1/orders/{order_id}");
        assert_eq!(tpl.variables(), vec!["order_id"]);
        assert_eq!(tpl.matches("/v1/orders/o-1"), bind(&[("order_id", "o-1")]));
        assert_eq!(tpl.matches("/v1/orders"), None);
        assert_eq!(tpl.matches("/v1/orders/"), None, "empty segment never matches a variable");
        assert_eq!(tpl.matches("/v1/orders/a/b"), None);
        assert_eq!(tpl.matches("/v2/orders/o-1"), None);
    }

    #[test]
    fn several_variables() {
        let tpl = t("/v1/customers/{customer_id}/orders/{order_id}");
        assert_eq!(tpl.variables(), vec!["customer_id", "order_id"]);
        assert_eq!(tpl.matches("/v1/customers/c1/orders/o2"), bind(&[("customer_id", "c1"), ("order_id", "o2")]));
        assert_eq!(tpl.matches("/v1/customers//orders/o2"), None);
    }

    #[test]
    fn nested_field_path() {
        let tpl = t("/v1/orders/{order.id}/items/{item.sku.code}");
        assert_eq!(tpl.variables(), vec!["order.id", "item.sku.code"]);
        assert_eq!(tpl.matches("/v1/orders/o-9/items/s-1"), bind(&[("order.id", "o-9"), ("item.sku.code", "s-1")]));
    }

    #[test]
    fn variable_with_segments() {
        let tpl = t("/v1/{name=shelves/*/books/*}");
        assert_eq!(tpl.variables(), vec!["name"]);
        assert_eq!(tpl.matches("/v1/shelves/s1/books/b2"), bind(&[("name", "shelves/s1/books/b2")]));
        assert_eq!(tpl.matches("/v1/shelves/s1/books"), None);
        assert_eq!(tpl.matches("/v1/shelves/s1/magazines/b2"), None);
        assert_eq!(tpl.matches("/v1/shelves/s1/books/b2/x"), None);
        assert_eq!(tpl.matches("/v1/shelves//books/b2"), None);
        assert_eq!(tpl.openapi_path(), "/v1/{name}");
    }

    #[test]
    fn variable_with_single_literal_segment() {
        let tpl = t("/v1/{kind=orders}/{id}");
        assert_eq!(tpl.matches("/v1/orders/7"), bind(&[("kind", "orders"), ("id", "7")]));
        assert_eq!(tpl.matches("/v1/sagas/7"), None);
    }

    #[test]
    fn double_wildcard_variable_zero_one_many() {
        let tpl = t("/v1/files/{path=**}");
        assert_eq!(tpl.variables(), vec!["path"]);
        assert_eq!(tpl.matches("/v1/files"), bind(&[("path", "")]));
        assert_eq!(tpl.matches("/v1/files/a"), bind(&[("path", "a")]));
        assert_eq!(tpl.matches("/v1/files/a/b/c"), bind(&[("path", "a/b/c")]));
        assert_eq!(tpl.matches("/v1/files/"), None, "trailing empty segment");
        assert_eq!(tpl.matches("/v1/files/a//c"), None, "empty segment inside");
        assert_eq!(tpl.matches("/v1/other/a"), None);
    }

    #[test]
    fn double_wildcard_after_literals_inside_variable() {
        let tpl = t("/v1/{name=projects/*/docs/**}");
        assert_eq!(tpl.matches("/v1/projects/p/docs"), bind(&[("name", "projects/p/docs")]));
        assert_eq!(tpl.matches("/v1/projects/p/docs/a/b"), bind(&[("name", "projects/p/docs/a/b")]));
        assert_eq!(tpl.matches("/v1/projects/p"), None);
    }

    #[test]
    fn bare_wildcards_match_without_binding() {
        let tpl = t("/v1/*/x");
        assert!(tpl.variables().is_empty());
        assert_eq!(tpl.matches("/v1/anything/x"), bind(&[]));
        assert_eq!(tpl.matches("/v1//x"), None);
        assert_eq!(tpl.matches("/v1/a/b/x"), None);
        assert_eq!(tpl.matches("/v1/a/y"), None);

        let deep = t("/v1/{id}/**");
        assert_eq!(deep.matches("/v1/7"), bind(&[("id", "7")]));
        assert_eq!(deep.matches("/v1/7/a/b"), bind(&[("id", "7")]));
        assert_eq!(deep.openapi_path(), "/v1/{id}/**");
    }

    #[test]
    fn custom_verb_match_and_non_match() {
        let tpl = t("/v1/orders/{order_id}:confirm");
        assert_eq!(tpl.verb(), Some("confirm"));
        assert_eq!(tpl.variables(), vec!["order_id"]);
        assert_eq!(tpl.matches("/v1/orders/o-1:confirm"), bind(&[("order_id", "o-1")]));
        assert_eq!(tpl.matches("/v1/orders/o-1"), None, "verb missing");
        assert_eq!(tpl.matches("/v1/orders/o-1:cancel"), None, "other verb");
        assert_eq!(tpl.matches("/v1/orders/:confirm"), None, "empty variable");
        assert_eq!(tpl.matches("/v1/orders/o-1:confirm/"), None);
        // The verb is split at the last ':'.
        assert_eq!(tpl.matches("/v1/orders/a:b:confirm"), bind(&[("order_id", "a:b")]));
    }

    #[test]
    fn verb_on_literal_segment() {
        let tpl = t("/v1/inventory:lowStock");
        assert_eq!(tpl.verb(), Some("lowStock"));
        assert_eq!(tpl.matches("/v1/inventory:lowStock"), bind(&[]));
        assert_eq!(tpl.matches("/v1/inventory"), None);
        assert_eq!(tpl.matches("/v1/inventory:lowstock"), None);
    }

    #[test]
    fn verb_after_double_wildcard() {
        let tpl = t("/v1/{name=**}:publish");
        assert_eq!(tpl.matches("/v1/a/b:publish"), bind(&[("name", "a/b")]));
        assert_eq!(tpl.matches("/v1:publish"), bind(&[("name", "")]));
        assert_eq!(tpl.matches("/v1/a/b"), None);
    }

    #[test]
    fn template_without_verb_rejects_verb_unless_captured() {
        let literal = t("/v1/orders");
        assert_eq!(literal.matches("/v1/orders:confirm"), None);
        let variable = t("/v1/streams/{id}");
        assert_eq!(variable.matches("/v1/streams/a:b"), bind(&[("id", "a:b")]));
        assert_eq!(variable.matches("/v1/streams/o-1:confirm"), bind(&[("id", "o-1:confirm")]));
        let with_tail = t("/v1/streams/{id}/events");
        assert_eq!(with_tail.matches("/v1/streams/s/events:confirm"), None);
    }

    #[test]
    fn percent_decoding_single_segment_variable() {
        let tpl = t("/v1/orders/{order_id}");
        assert_eq!(tpl.matches("/v1/orders/a%20b"), bind(&[("order_id", "a b")]));
        assert_eq!(tpl.matches("/v1/orders/a%2Fb"), bind(&[("order_id", "a/b")]));
        assert_eq!(tpl.matches("/v1/orders/a%2fb"), bind(&[("order_id", "a/b")]));
        assert_eq!(tpl.matches("/v1/orders/caf%C3%A9"), bind(&[("order_id", "café")]));
        assert_eq!(tpl.matches("/v1/orders/a%3Ab"), bind(&[("order_id", "a:b")]));
        // A '%' that does not start an escape is kept as is.
        assert_eq!(tpl.matches("/v1/orders/100%"), bind(&[("order_id", "100%")]));
        assert_eq!(tpl.matches("/v1/orders/%zz"), bind(&[("order_id", "%zz")]));
    }

    #[test]
    fn percent_decoding_multi_segment_variable_keeps_encoded_slash() {
        let deep = t("/v1/{path=**}");
        assert_eq!(deep.matches("/v1/a%2Fb/c%20d"), bind(&[("path", "a%2Fb/c d")]));
        assert_eq!(deep.matches("/v1/a%2fb"), bind(&[("path", "a%2fb")]));
        let named = t("/v1/{name=shelves/*/books/*}");
        assert_eq!(named.matches("/v1/shelves/s%2F1/books/b%201"), bind(&[("name", "shelves/s%2F1/books/b 1")]));
    }

    #[test]
    fn invalid_utf8_is_no_match() {
        assert_eq!(t("/v1/orders/{id}").matches("/v1/orders/%FF"), None);
        assert_eq!(t("/v1/{path=**}").matches("/v1/a/%C3"), None);
    }

    #[test]
    fn parse_errors() {
        let tpl = |s: &str| s.to_owned();
        assert_eq!(err(""), TemplateError::Empty);
        assert_eq!(err("v1/orders"), TemplateError::MissingLeadingSlash { template: tpl("v1/orders") });
        assert_eq!(err("/"), TemplateError::EmptySegment { template: tpl("/"), position: 1 });
        assert_eq!(err("/v1//x"), TemplateError::EmptySegment { template: tpl("/v1//x"), position: 4 });
        assert_eq!(err("/v1/"), TemplateError::EmptySegment { template: tpl("/v1/"), position: 4 });
        // Unbalanced braces.
        assert_eq!(err("/v1/{id"), TemplateError::UnclosedVariable { template: tpl("/v1/{id"), position: 4 });
        assert_eq!(
            err("/v1/{name=a/*"),
            TemplateError::UnclosedVariable { template: tpl("/v1/{name=a/*"), position: 4 }
        );
        assert_eq!(err("/v1/id}"), TemplateError::UnmatchedCloseBrace { template: tpl("/v1/id}"), position: 6 });
        assert_eq!(err("/v1/}"), TemplateError::UnmatchedCloseBrace { template: tpl("/v1/}"), position: 4 });
        // `**` not last.
        assert_eq!(err("/v1/**/x"), TemplateError::DoubleWildcardNotLast { template: tpl("/v1/**/x"), position: 4 });
        assert_eq!(
            err("/v1/{p=**}/x"),
            TemplateError::DoubleWildcardNotLast { template: tpl("/v1/{p=**}/x"), position: 7 }
        );
        assert_eq!(
            err("/v1/{p=**/x}"),
            TemplateError::DoubleWildcardNotLast { template: tpl("/v1/{p=**/x}"), position: 7 }
        );
        // Empty variable name.
        assert_eq!(err("/v1/{}"), TemplateError::EmptyVariableName { template: tpl("/v1/{}"), position: 4 });
        assert_eq!(err("/v1/{=*}"), TemplateError::EmptyVariableName { template: tpl("/v1/{=*}"), position: 4 });
        // Nested variable.
        assert_eq!(err("/v1/{a={b}}"), TemplateError::NestedVariable { template: tpl("/v1/{a={b}}"), position: 7 });
        assert_eq!(err("/v1/{a{b}}"), TemplateError::NestedVariable { template: tpl("/v1/{a{b}}"), position: 6 });
        // Bad identifiers.
        assert!(matches!(err("/v1/{1a}"), TemplateError::InvalidFieldPath { position: 5, .. }));
        assert!(matches!(err("/v1/{a-b}"), TemplateError::InvalidFieldPath { position: 6, .. }));
        assert!(matches!(err("/v1/{a.}"), TemplateError::InvalidFieldPath { position: 7, .. }));
        assert!(matches!(err("/v1/{a..b}"), TemplateError::InvalidFieldPath { position: 7, .. }));
        assert!(matches!(err("/v1/{.a}"), TemplateError::InvalidFieldPath { position: 5, .. }));
        assert!(matches!(err("/v1/{a b}"), TemplateError::InvalidFieldPath { position: 6, .. }));
        // Verbs.
        assert_eq!(err("/v1/x:"), TemplateError::EmptyVerb { template: tpl("/v1/x:"), position: 6 });
        assert!(matches!(err("/v1/x:a/b"), TemplateError::UnexpectedChar { found: '/', position: 7, .. }));
        assert!(matches!(err("/v1/x:a:b"), TemplateError::UnexpectedChar { found: ':', position: 7, .. }));
        // Odd characters and wildcards glued to literals.
        assert!(matches!(err("/v1/a*"), TemplateError::UnexpectedChar { found: '*', position: 5, .. }));
        assert!(matches!(err("/v1/*a"), TemplateError::UnexpectedChar { found: 'a', position: 5, .. }));
        assert!(matches!(err("/v1/***"), TemplateError::UnexpectedChar { found: '*', position: 6, .. }));
        assert!(matches!(err("/v1/a b"), TemplateError::UnexpectedChar { found: ' ', position: 5, .. }));
        assert!(matches!(err("/v1/{a=b:c}"), TemplateError::UnexpectedChar { found: ':', position: 8, .. }));
        assert_eq!(err("/v1/a%2"), TemplateError::InvalidPercentEncoding { template: tpl("/v1/a%2"), position: 5 });
        assert_eq!(err("/v1/{a=}"), TemplateError::EmptySegment { template: tpl("/v1/{a=}"), position: 7 });
        assert_eq!(
            err("/v1/{a}/{a}"),
            TemplateError::DuplicateVariable { template: tpl("/v1/{a}/{a}"), field_path: tpl("a") }
        );
    }

    #[test]
    fn error_messages_say_where_and_why() {
        assert_eq!(
            err("/v1/**/x").to_string(),
            "path template `/v1/**/x`: `**` at byte 4 must be the last segment of the template"
        );
        assert_eq!(
            err("/v1/{id").to_string(),
            "path template `/v1/{id`: the variable opened at byte 4 is never closed with '}'"
        );
        assert_eq!(
            err("/v1/{1a}").to_string(),
            "path template `/v1/{1a}`: invalid field path at byte 5: an identifier must start with an ASCII letter or '_'"
        );
        assert_eq!(
            err("/v1/a*").to_string(),
            "path template `/v1/a*`: unexpected '*' at byte 5, expected '/', ':' (a verb) or the end of the template"
        );
    }

    #[test]
    fn specificity_orders_more_specific_first() {
        let mut templates = [
            t("/v1/{name=**}"),
            t("/v1/orders/{id}"),
            t("/v1/orders/search"),
            t("/v1/orders/{id}:confirm"),
            t("/v1/{a}/{b}"),
        ];
        templates.sort_by_key(PathTemplate::specificity);
        let order: Vec<String> = templates.iter().map(ToString::to_string).collect();
        assert_eq!(
            order,
            vec!["/v1/orders/search", "/v1/orders/{id}:confirm", "/v1/orders/{id}", "/v1/{a}/{b}", "/v1/{name=**}"]
        );
        assert!(t("/v1/orders/search").specificity() < t("/v1/orders/{id}").specificity());
        assert!(t("/v1/orders/{id}").specificity() < t("/v1/{name=**}").specificity());
        assert!(t("/v1/{id}").specificity() < t("/v1/{id=**}").specificity());
        assert!(t("/v1/streams/{id}:at").specificity() < t("/v1/streams/{id}").specificity());
        assert!(t("/v1/orders/{id}").specificity() == t("/v1/sagas/{id}").specificity());
        assert!(t("/v1/{a}/{b}").specificity() < t("/v1/{name=**}").specificity(), "** must not shadow");
        assert!(t("/v1/{name=**}:get").specificity() < t("/v1/{a}/{b}").specificity(), "verb first");
        assert!(t("/v1/orders/{id}").specificity() < t("/v1/{a}:x").specificity(), "literals before verb");
    }

    #[test]
    fn openapi_path_renders_variables_by_field_path() {
        assert_eq!(t("/v1/orders/{order_id}:confirm").openapi_path(), "/v1/orders/{order_id}:confirm");
        assert_eq!(t("/v1/orders/{order.id}").openapi_path(), "/v1/orders/{order.id}");
        assert_eq!(t("/v1/{name=shelves/*/books/*}/pages").openapi_path(), "/v1/{name}/pages");
        assert_eq!(t("/v1/{path=**}").openapi_path(), "/v1/{path}");
        assert_eq!(t("/v1/orders").openapi_path(), "/v1/orders");
        assert_eq!(t("/v1/*/x").openapi_path(), "/v1/*/x");
        assert_eq!(t("/v1/inventory:lowStock").openapi_path(), "/v1/inventory:lowStock");
    }

    #[test]
    fn display_and_debug_show_the_template() {
        let tpl = t("/v1/{name=shelves/*}:get");
        assert_eq!(tpl.to_string(), "/v1/{name=shelves/*}:get");
        assert_eq!(format!("{tpl:?}"), "PathTemplate(\"/v1/{name=shelves/*}:get\")");
    }

    #[test]
    fn every_annotated_template_shape_of_the_repository_parses() {
        for (template, path, expected) in [
            (
                "/v1/streams/{stream_id}/snapshots:latest",
                "/v1/streams/s-1/snapshots:latest",
                vec![("stream_id", "s-1")],
            ),
            ("/v1/events:subscribe", "/v1/events:subscribe", vec![]),
            (
                "/v1/accounts/{from_account_id}:requestTransfer",
                "/v1/accounts/a:requestTransfer",
                vec![("from_account_id", "a")],
            ),
        ] {
            let tpl = t(template);
            assert_eq!(tpl.matches(path), bind(&expected), "{template} vs {path}");
            assert_eq!(tpl.openapi_path(), template);
        }
    }
}
