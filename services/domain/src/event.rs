//! Events as they travel to and from the store: a type name, a schema
//! version and a JSON body.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0}")]
    UnknownType(String),
    #[error("event {event_type} v{found} is not the current v{current}: upcast it first")]
    Version { event_type: String, found: u32, current: u32 },
    #[error("event {event_type} has malformed data: {message}")]
    Data { event_type: String, message: String },
}

/// An aggregate's event enum, one variant per event type.
pub trait DomainEvent: Sized {
    /// Every event type of the enum with the schema version the code writes.
    const TYPES: &'static [(&'static str, u32)];

    /// The stored type name, e.g. `OrderCreated`.
    fn event_type(&self) -> &'static str;

    /// The JSON body.
    fn to_data(&self) -> Value;

    /// An event from its stored type and body, which must be of the
    /// current schema version (see [`crate::upcast`]).
    fn from_data(event_type: &str, schema_version: u32, data: Value) -> Result<Self, DecodeError>;

    /// [`DomainEvent::from_data`] from a borrowed body (no copy of it).
    fn from_data_ref(event_type: &str, schema_version: u32, data: &Value) -> Result<Self, DecodeError>;

    /// The schema version the code writes for `event_type`.
    fn current_version(event_type: &str) -> Option<u32> {
        Self::TYPES.iter().find(|(t, _)| *t == event_type).map(|(_, v)| *v)
    }

    fn schema_version(&self) -> u32 {
        Self::current_version(self.event_type()).expect("every variant is listed in TYPES")
    }
}

/// Checks that `found` is the current version of `event_type`, a type of
/// `E`; then the decode error of a body of it that does not fit.
pub(crate) fn decoding<E: DomainEvent>(
    event_type: &str,
    found: u32,
) -> Result<impl Fn(serde_json::Error) -> DecodeError + '_, DecodeError> {
    let current = E::current_version(event_type).ok_or_else(|| DecodeError::UnknownType(event_type.to_owned()))?;
    if found != current {
        return Err(DecodeError::Version { event_type: event_type.to_owned(), found, current });
    }
    Ok(move |e: serde_json::Error| DecodeError::Data { event_type: event_type.to_owned(), message: e.to_string() })
}

/// Declares an aggregate's event enum: one variant per event struct, the
/// struct's name as the stored type, with its current schema version.
macro_rules! domain_events {
    ($(#[$meta:meta])* pub enum $name:ident { $($variant:ident($ty:ident) = $version:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($variant($ty),)*
        }

        impl $crate::DomainEvent for $name {
            const TYPES: &'static [(&'static str, u32)] = &[$((stringify!($ty), $version),)*];

            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => stringify!($ty),)*
                }
            }

            fn to_data(&self) -> serde_json::Value {
                match self {
                    $(Self::$variant(e) => serde_json::to_value(e).expect("domain events serialize to JSON"),)*
                }
            }

            fn from_data(
                event_type: &str,
                schema_version: u32,
                data: serde_json::Value,
            ) -> Result<Self, $crate::DecodeError> {
                let malformed = $crate::event::decoding::<Self>(event_type, schema_version)?;
                match event_type {
                    $(stringify!($ty) => serde_json::from_value(data).map(Self::$variant).map_err(malformed),)*
                    other => Err($crate::DecodeError::UnknownType(other.to_owned())),
                }
            }

            fn from_data_ref(
                event_type: &str,
                schema_version: u32,
                data: &serde_json::Value,
            ) -> Result<Self, $crate::DecodeError> {
                let malformed = $crate::event::decoding::<Self>(event_type, schema_version)?;
                match event_type {
                    $(stringify!($ty) => <$ty as serde::Deserialize>::deserialize(data)
                        .map(Self::$variant)
                        .map_err(malformed),)*
                    other => Err($crate::DecodeError::UnknownType(other.to_owned())),
                }
            }
        }

        $(
            impl From<$ty> for $name {
                fn from(event: $ty) -> Self {
                    Self::$variant(event)
                }
            }
        )*
    };
}

pub(crate) use domain_events;

/// Declares an aggregate's command enum: one variant per command struct.
macro_rules! command_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($variant:ident($ty:ident),)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($variant($ty),)*
        }

        $(
            impl From<$ty> for $name {
                fn from(command: $ty) -> Self {
                    Self::$variant(command)
                }
            }
        )*
    };
}

pub(crate) use command_enum;
