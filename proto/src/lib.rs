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
    macro_rules! package {
        ($($name:ident => $file:literal,)*) => {
            $(
                pub mod $name {
                    pub mod v1 {
                        include!(concat!(env!("OUT_DIR"), "/", $file));
                    }
                }
            )*
        };
    }

    package! {
        common => "eventfold.common.v1.rs",
        eventstore => "eventfold.eventstore.v1.rs",
        orders => "eventfold.orders.v1.rs",
        inventory => "eventfold.inventory.v1.rs",
        payments => "eventfold.payments.v1.rs",
        shipping => "eventfold.shipping.v1.rs",
        accounts => "eventfold.accounts.v1.rs",
        users => "eventfold.users.v1.rs",
        query => "eventfold.query.v1.rs",
        sagas => "eventfold.sagas.v1.rs",
        admin => "eventfold.admin.v1.rs",
        topics => "eventfold.topics.v1.rs",
    }
}

pub use eventfold::{
    accounts::v1 as accounts, admin::v1 as admin, common::v1 as common, eventstore::v1 as eventstore,
    inventory::v1 as inventory, orders::v1 as orders, payments::v1 as payments, query::v1 as query, sagas::v1 as sagas,
    shipping::v1 as shipping, topics::v1 as topics, users::v1 as users,
};
