//! [`Sensitive`]: the one masking mechanism of the typed values. A payment
//! token, an email, an API key or a password is held as a `Sensitive`
//! wherever it lives in a command, an event, an aggregate's state or a
//! saga's data, so that `{:?}` and `{}` of anything holding it print
//! `<redacted>`: a log line or an error message that formats a command, an
//! envelope or an event never shows the value.
//!
//! Which fields are sensitive is declared once, in the proto files, with
//! the field option `(eventfold.auth.v1.sensitive) = true`; a test of the
//! command side (`services/command/tests/sensitive.rs`) sends every
//! command RPC with a distinct value in every field and checks that the
//! domain masks exactly the fields the descriptors mark, in the commands
//! and in the events decided from them.
//!
//! Serialization is transparent: the event store, the snapshots and the
//! saga data keep the value itself (masking is for logs and errors, not
//! for the data the domain needs).

use std::{cell::Cell, fmt};

use serde::{Deserialize, Serialize};

/// What a masked value prints as.
pub const REDACTED: &str = "<redacted>";

thread_local! {
    /// Set while [`unmasked_debug`] formats on this thread.
    static UNMASKED: Cell<bool> = const { Cell::new(false) };
}

/// A value that never appears in a log or an error message (see the
/// module documentation). [`Sensitive::expose`] gives the value to the
/// code that needs it.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sensitive<T>(T);

impl<T> Sensitive<T> {
    pub fn new(value: T) -> Self {
        Sensitive(value)
    }

    /// The value itself, for the code that uses it (never for a log).
    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> From<T> for Sensitive<T> {
    fn from(value: T) -> Self {
        Sensitive(value)
    }
}

impl From<&str> for Sensitive<String> {
    fn from(value: &str) -> Self {
        Sensitive(value.to_owned())
    }
}

impl<T: fmt::Debug> fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if UNMASKED.with(Cell::get) { self.0.fmt(f) } else { f.write_str(REDACTED) }
    }
}

impl<T> fmt::Display for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// `{:?}` of `value` with its sensitive values shown: for text that is
/// hashed at once and never leaves the process, such as the fingerprint
/// that tells a retry from another command under the same request id (two
/// commands that differ only in a payment token are different commands).
pub fn unmasked_debug(value: &dyn fmt::Debug) -> String {
    /// Restores the flag, also when formatting panics.
    struct Restore(bool);

    impl Drop for Restore {
        fn drop(&mut self) {
            UNMASKED.with(|flag| flag.set(self.0));
        }
    }

    let _restore = Restore(UNMASKED.with(|flag| flag.replace(true)));
    format!("{value:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Its fields are read through `Debug` only.
    #[allow(dead_code)]
    #[derive(Debug)]
    struct Holder {
        id: &'static str,
        token: Option<Sensitive<String>>,
    }

    fn holder() -> Holder {
        Holder { id: "o-1", token: Some("tok_secret".into()) }
    }

    #[test]
    fn debug_and_display_print_the_mark_not_the_value() {
        let holder = holder();
        assert_eq!(format!("{holder:?}"), r#"Holder { id: "o-1", token: Some(<redacted>) }"#);
        assert!(!format!("{holder:#?}").contains("tok_secret"));
        assert_eq!(holder.token.as_ref().map(ToString::to_string).as_deref(), Some(REDACTED));
        assert_eq!(holder.token.as_ref().map(|t| t.expose().as_str()), Some("tok_secret"));
    }

    #[test]
    fn serde_keeps_the_value() {
        let token = Sensitive::new("tok_secret".to_owned());
        let json = serde_json::to_value(&token).unwrap();
        assert_eq!(json, serde_json::json!("tok_secret"));
        assert_eq!(serde_json::from_value::<Sensitive<String>>(json).unwrap(), token);
    }

    #[test]
    fn unmasked_debug_shows_the_value_only_inside_the_call() {
        let holder = holder();
        assert_eq!(unmasked_debug(&holder), r#"Holder { id: "o-1", token: Some("tok_secret") }"#);
        assert_eq!(format!("{holder:?}"), r#"Holder { id: "o-1", token: Some(<redacted>) }"#, "masked again after");
        let panicking = std::panic::catch_unwind(|| {
            struct Boom;
            impl fmt::Debug for Boom {
                fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
                    panic!("formatting fails")
                }
            }
            unmasked_debug(&Boom)
        });
        assert!(panicking.is_err());
        assert!(!format!("{holder:?}").contains("tok_secret"), "masked again after a panic");
    }
}
