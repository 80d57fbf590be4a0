//! Confluent's wire format around a real datum.

use eventfold_schemas::{Catalog, Error, MAGIC_BYTE, unwire, wire};
use serde_json::json;

#[test]
fn wire_and_unwire_round_trip() {
    let catalog = Catalog::load().unwrap();
    let body = json!({ "order_id": "ord-1", "reason": "duplicate" });
    let avro = catalog.encode("OrderCancelled", 1, &body).unwrap();
    let framed = wire(0x0102_0304, &avro);
    assert_eq!(framed[..5], [MAGIC_BYTE, 1, 2, 3, 4]);
    assert_eq!(framed[5..], avro[..]);
    let (id, datum) = unwire(&framed).unwrap();
    assert_eq!(id, 0x0102_0304);
    assert_eq!(catalog.decode("OrderCancelled", 1, datum).unwrap(), body);

    assert_eq!(unwire(&wire(u32::MAX, &[])).unwrap(), (u32::MAX, &[][..]));
}

#[test]
fn a_bad_magic_byte_or_a_short_value_is_an_error() {
    let mut framed = wire(7, b"\x02x");
    framed[0] = 1;
    let err = unwire(&framed).unwrap_err();
    assert!(matches!(err, Error::Wire(_)), "{err:?}");
    assert_eq!(err.to_string(), "not in the Confluent wire format: magic byte is 0x01, not 0x00");

    let err = unwire(&[0, 0, 0, 7]).unwrap_err();
    assert_eq!(err.to_string(), "not in the Confluent wire format: 4 bytes are too short for the 5-byte header");
}
