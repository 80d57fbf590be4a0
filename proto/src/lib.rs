//! The eventfold Protobuf catalog: the `.proto` files under `proto/` compiled
//! hermetically (protox, no system `protoc`) into prost messages and tonic
//! clients and servers, plus the encoded descriptor set that server
//! reflection and the REST gateway read.

#![allow(unreachable_pub, clippy::all, clippy::pedantic)]

/// The encoded `FileDescriptorSet` of the whole catalog, imports included.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/eventfold_descriptor.bin"));

/// `google.api` annotation messages (`HttpRule`).
pub mod google {
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
    }
}

/// eventfold's own packages.
pub mod eventfold {
    pub mod eventstore {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/eventfold.eventstore.v1.rs"));
        }
    }
}

pub use eventfold::eventstore::v1 as eventstore;
