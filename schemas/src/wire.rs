//! Confluent's wire format: magic byte 0, the schema id as 4 big-endian
//! bytes, then the Avro datum.

use crate::Error;

/// The first byte of every value in the wire format.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus schema id.
const HEADER_LEN: usize = 5;

/// `avro_body` framed with its schema id.
pub fn wire(schema_id: u32, avro_body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + avro_body.len());
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(avro_body);
    out
}

/// The schema id and the Avro datum of a value in the wire format.
pub fn unwire(bytes: &[u8]) -> Result<(u32, &[u8]), Error> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::Wire(format!("{} bytes are too short for the 5-byte header", bytes.len())));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(Error::Wire(format!("magic byte is {:#04x}, not 0x00", bytes[0])));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}
