//! Users: registration, logins and recorded actions (the input of the
//! user-activity timeline).

use serde::{Deserialize, Serialize};

use crate::{
    Aggregate, Reason, Rejection, Sensitive, Violation, check_id, check_text,
    event::{command_enum, domain_events},
    invalid_if_any,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterUser {
    pub user_id: String,
    /// Never logged.
    pub email: Sensitive<String>,
    pub display_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLogin {
    /// Where the login came from (an address or client name), for the
    /// timeline.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordAction {
    /// What the user did, e.g. `viewed_product`.
    pub action: String,
    /// What it was done to, e.g. a product id; may be empty.
    pub subject: String,
}

command_enum! {
    pub enum UserCommand {
        Register(RegisterUser),
        Login(RecordLogin),
        Action(RecordAction),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: String,
    pub email: Sensitive<String>,
    pub display_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLoggedIn {
    pub user_id: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserActionRecorded {
    pub user_id: String,
    pub action: String,
    pub subject: String,
}

domain_events! {
    pub enum UserEvent {
        Registered(UserRegistered) = 1,
        LoggedIn(UserLoggedIn) = 1,
        ActionRecorded(UserActionRecorded) = 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub registered: bool,
    pub email: Sensitive<String>,
    pub display_name: String,
    pub logins: u64,
    pub actions: u64,
}

fn check_email(email: &str, violations: &mut Vec<Violation>) {
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if !valid {
        violations.push(Violation::new("email", "must be an address like name@example.com"));
    }
}

impl Aggregate for User {
    const CATEGORY: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;

    fn creates(command: &UserCommand) -> bool {
        matches!(command, UserCommand::Register(_))
    }

    fn validate(command: &UserCommand) -> Vec<Violation> {
        let mut violations = Vec::new();
        match command {
            UserCommand::Register(c) => {
                check_id("user_id", &c.user_id, &mut violations);
                check_email(c.email.expose(), &mut violations);
                check_text("display_name", &c.display_name, 200, &mut violations);
            }
            UserCommand::Login(c) => check_text("source", &c.source, 200, &mut violations),
            UserCommand::Action(c) => {
                check_id("action", &c.action, &mut violations);
                if c.subject.len() > 200 || c.subject.chars().any(char::is_control) {
                    violations.push(Violation::new("subject", "must be at most 200 bytes without control characters"));
                }
            }
        }
        violations
    }

    fn decide(&self, command: &UserCommand) -> Result<Vec<UserEvent>, Rejection> {
        invalid_if_any(Self::validate(command))?;
        if let UserCommand::Register(c) = command {
            if self.registered {
                return Err(Rejection::rule(Reason::UserAlreadyRegistered, format!("user {} exists", self.id)));
            }
            return Ok(vec![
                UserRegistered {
                    user_id: c.user_id.clone(),
                    email: c.email.clone(),
                    display_name: c.display_name.clone(),
                }
                .into(),
            ]);
        }
        if !self.registered {
            return Err(Rejection::rule(Reason::UserNotFound, "the user is not registered"));
        }
        let user_id = self.id.clone();
        Ok(vec![match command {
            UserCommand::Register(_) => unreachable!("handled above"),
            UserCommand::Login(c) => UserLoggedIn { user_id, source: c.source.clone() }.into(),
            UserCommand::Action(c) => {
                UserActionRecorded { user_id, action: c.action.clone(), subject: c.subject.clone() }.into()
            }
        }])
    }

    fn evolve(mut self, event: &UserEvent) -> Self {
        match event {
            UserEvent::Registered(e) => {
                self.id = e.user_id.clone();
                self.registered = true;
                self.email = e.email.clone();
                self.display_name = e.display_name.clone();
            }
            UserEvent::LoggedIn(_) => self.logins += 1,
            UserEvent::ActionRecorded(_) => self.actions += 1,
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    fn register() -> RegisterUser {
        RegisterUser { user_id: "u-1".into(), email: "ada@example.com".into(), display_name: "Ada".into() }
    }

    fn registered() -> UserEvent {
        UserRegistered { user_id: "u-1".into(), email: "ada@example.com".into(), display_name: "Ada".into() }.into()
    }

    #[test]
    fn register_once_with_a_valid_email() {
        Scenario::<User>::given_no_events().when(register()).then_expect([registered()]);
        Scenario::<User>::given([registered()]).when(register()).then_reject(Reason::UserAlreadyRegistered);
        for bad in ["", "ada", "ada@", "@example.com", "ada@example", "ada @example.com", "ada@.com"] {
            Scenario::<User>::given_no_events()
                .when(RegisterUser { email: bad.into(), ..register() })
                .then_invalid(&["email"]);
        }
    }

    #[test]
    fn the_email_is_masked_and_its_violation_names_the_field_not_the_value() {
        let bad = "ada at example.com";
        let command = UserCommand::Register(RegisterUser { email: bad.into(), ..register() });
        let Err(Rejection::Invalid(violations)) = User::default().decide(&command) else {
            panic!("an invalid email is refused")
        };
        let text = format!("{command:?} {violations:?}");
        assert!(!text.contains(bad) && text.contains("<redacted>"), "{text}");
        let events = User::default().decide(&register().into()).unwrap();
        let state = User::default().fold(&events);
        let text = format!("{events:?} {state:?}");
        assert!(!text.contains("ada@example.com"), "{text}");
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["email"], "ada@example.com", "a snapshot keeps the value");
    }

    #[test]
    fn logins_and_actions_need_a_registered_user() {
        let state = Scenario::<User>::given([registered()])
            .when(RecordLogin { source: "127.0.0.1".into() })
            .then_expect([UserLoggedIn { user_id: "u-1".into(), source: "127.0.0.1".into() }]);
        assert_eq!(state.logins, 1);
        Scenario::<User>::given([registered()])
            .when(RecordAction { action: "viewed_product".into(), subject: "sku-1".into() })
            .then_expect([UserActionRecorded {
                user_id: "u-1".into(),
                action: "viewed_product".into(),
                subject: "sku-1".into(),
            }]);
        Scenario::<User>::given_no_events().when(RecordLogin { source: "x".into() }).then_reject(Reason::UserNotFound);
        Scenario::<User>::given_no_events()
            .when(RecordAction { action: "x".into(), subject: String::new() })
            .then_reject(Reason::UserNotFound);
        Scenario::<User>::given([registered()]).when(RecordLogin { source: String::new() }).then_invalid(&["source"]);
        Scenario::<User>::given([registered()])
            .when(RecordAction { action: "two words".into(), subject: "\u{7}".into() })
            .then_invalid(&["action", "subject"]);
    }
}
