//! Segment files: a sequence of frames, each `length (u32 LE) ‖ CRC32C of
//! the payload (u32 LE) ‖ payload`. A frame is whole or it is not there: a
//! reader checks the checksum of every frame it reads, and recovery stops at
//! the first frame that is short or does not match (a torn tail).

use std::{
    fs::File,
    io::{self, BufReader, Read, Seek, SeekFrom},
    os::unix::fs::FileExt,
};

/// Bytes of a frame's header.
pub(crate) const HEADER_LEN: u64 = 8;
/// Largest payload of one frame: one event or snapshot (at most 1 MiB of
/// canonical JSON, escaped once more inside the record) with room to spare.
pub(crate) const MAX_PAYLOAD: u32 = 8 * 1024 * 1024;

/// Append one frame holding `payload` to `out`; its length, or `None` when
/// the payload is larger than [`MAX_PAYLOAD`].
pub(crate) fn push(out: &mut Vec<u8>, payload: &[u8]) -> Option<u32> {
    let len = u32::try_from(payload.len()).ok().filter(|len| *len <= MAX_PAYLOAD)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Some(len)
}

/// The payload of the frame at `offset`, whose payload is `len` bytes long;
/// an error when the frame there is not that frame (a wrong length or
/// checksum).
pub(crate) fn read(file: &File, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    let payload_len = usize::try_from(len).map_err(|_| invalid("frame length"))?;
    let mut buf = vec![0; payload_len.saturating_add(8)];
    file.read_exact_at(&mut buf, offset)?;
    let (header, payload) = buf.split_at(8);
    let stored_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let stored_crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if stored_len != len || stored_crc != crc32c::crc32c(payload) {
        return Err(invalid("a frame does not match its checksum"));
    }
    buf.drain(..8);
    Ok(buf)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Where a scan of a segment stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// The end of the last whole frame.
    pub(crate) valid_end: u64,
    /// The file's length: beyond `valid_end` lies a torn tail.
    pub(crate) file_len: u64,
}

/// Call `each(offset, length, payload)` for every whole frame of `file` from
/// `from` on, in order; stop at the end or at the first frame that is short,
/// of an impossible length or does not match its checksum.
pub(crate) fn scan<E>(
    file: &File,
    from: u64,
    mut each: impl FnMut(u64, u32, &[u8]) -> Result<(), E>,
) -> Result<io::Result<Scanned>, E> {
    let file_len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Ok(Err(e)),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    if let Err(e) = reader.seek(SeekFrom::Start(from)) {
        return Ok(Err(e));
    }
    let mut offset = from;
    let mut payload = Vec::new();
    loop {
        let remaining = file_len.saturating_sub(offset);
        if remaining < HEADER_LEN {
            break;
        }
        let mut header = [0; 8];
        if let Err(e) = reader.read_exact(&mut header) {
            return Ok(Err(e));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let frame_len = HEADER_LEN.saturating_add(u64::from(len));
        if len == 0 || len > MAX_PAYLOAD || frame_len > remaining {
            break;
        }
        payload.resize(usize::try_from(len).unwrap_or(0), 0);
        if let Err(e) = reader.read_exact(&mut payload) {
            return Ok(Err(e));
        }
        if crc32c::crc32c(&payload) != crc {
            break;
        }
        each(offset, len, &payload)?;
        offset = offset.saturating_add(frame_len);
    }
    Ok(Ok(Scanned { valid_end: offset, file_len }))
}

/// A frame of a buffer: its offset, payload length and payload.
#[cfg(any(feature = "blob", test))]
pub(crate) type Frame<'a> = (u64, u32, &'a [u8]);

/// The whole frames of `bytes` (a blob), and where the last one ends.
#[cfg(any(feature = "blob", test))]
pub(crate) fn split(bytes: &[u8]) -> (Vec<Frame<'_>>, u64) {
    let mut frames = Vec::new();
    let mut offset = 0usize;
    while let Some(header) = bytes.get(offset..offset.saturating_add(8)) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let start = offset.saturating_add(8);
        let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
        let Some(payload) = bytes.get(start..end).filter(|_| len > 0 && len <= MAX_PAYLOAD) else { break };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        frames.push((offset as u64, len, payload));
        offset = end;
    }
    (frames, offset as u64)
}

/// The payload of the frame at `offset` of `bytes`, checked as [`read`]
/// checks a file's.
#[cfg(any(feature = "blob", test))]
pub(crate) fn read_slice(bytes: &[u8], offset: u64, len: u32) -> io::Result<&[u8]> {
    let start = usize::try_from(offset).map_err(|_| invalid("frame offset"))?;
    let payload_len = usize::try_from(len).map_err(|_| invalid("frame length"))?;
    let header = bytes.get(start..start.saturating_add(8)).ok_or_else(|| invalid("a frame is missing"))?;
    let payload = bytes
        .get(start.saturating_add(8)..start.saturating_add(8).saturating_add(payload_len))
        .ok_or_else(|| invalid("a frame is cut short"))?;
    let stored_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let stored_crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if stored_len != len || stored_crc != crc32c::crc32c(payload) {
        return Err(invalid("a frame does not match its checksum"));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            push(&mut out, p).expect("a small payload");
        }
        out
    }

    fn scan_all(bytes: &[u8]) -> (Vec<Vec<u8>>, Scanned) {
        let mut file = tempfile();
        file.write_all(bytes).expect("write");
        let mut seen = Vec::new();
        let scanned = scan::<()>(&file, 0, |_, _, p| {
            seen.push(p.to_vec());
            Ok(())
        })
        .expect("no callback error")
        .expect("scan");
        (seen, scanned)
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!("eventfold-frame-{}", uuid::Uuid::new_v4()));
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("a temporary file");
        std::fs::remove_file(&path).expect("unlink");
        file
    }

    #[test]
    fn whole_frames_are_read_back_and_a_torn_tail_is_where_the_scan_stops() {
        let bytes = frames(&[b"one", b"two", b"three"]);
        let (seen, scanned) = scan_all(&bytes);
        assert_eq!(seen, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        assert_eq!(scanned, Scanned { valid_end: bytes.len() as u64, file_len: bytes.len() as u64 });

        // Cut anywhere inside the last frame: the first two remain.
        let two = frames(&[b"one", b"two"]).len();
        for cut in two + 1..bytes.len() {
            let (seen, scanned) = scan_all(&bytes[..cut]);
            assert_eq!(seen.len(), 2, "cut at {cut}");
            assert_eq!(scanned.valid_end, two as u64, "cut at {cut}");
        }
        // A flipped bit in the last payload: its checksum fails.
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let (seen, scanned) = scan_all(&flipped);
        assert_eq!((seen.len(), scanned.valid_end), (2, two as u64));
    }

    #[test]
    fn frames_of_a_buffer_split_and_read_back() {
        let bytes = frames(&[b"one", b"two"]);
        let (split, end) = split(&bytes);
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(split.iter().map(|(_, _, p)| p.to_vec()).collect::<Vec<_>>(), [b"one".to_vec(), b"two".to_vec()]);
        let (offset, len, _) = split[1];
        assert_eq!(read_slice(&bytes, offset, len).expect("read"), b"two");
        assert!(read_slice(&bytes, offset, len + 1).is_err());
        let (cut, end) = super::split(&bytes[..bytes.len() - 1]);
        assert_eq!((cut.len(), end), (1, offset));
    }

    #[test]
    fn a_frame_is_read_at_its_offset_and_checked() {
        let mut file = tempfile();
        let bytes = frames(&[b"first", b"second"]);
        file.write_all(&bytes).expect("write");
        let second = HEADER_LEN + 5;
        assert_eq!(read(&file, second, 6).expect("read"), b"second");
        assert!(read(&file, second, 5).is_err(), "a wrong length is refused");
        assert!(read(&file, 0, 6).is_err(), "another frame is refused");
    }
}
