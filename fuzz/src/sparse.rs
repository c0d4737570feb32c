//! A compact encoding of an image file for the fuzzer: a VHDX is at least a few MiB, nearly all
//! zeros, and libFuzzer mutates small inputs far better than large ones.
//!
//! `length: u32 LE` (bytes, top bit ignored, capped at [`MAX_FILE`]), then records `page: u16 LE`, `n: u16 LE`,
//! `n` bytes (at most 4096, cut at the input's end) placed at `page * 4096`. Pages past the
//! length are dropped; a record may repeat a page (the last one wins).

/// The largest file an input decodes to (and a capped storage grows to).
pub const MAX_FILE: u64 = 16 << 20;
const PAGE: usize = 4096;

use crate::storage::Pages;

pub fn decode(data: &[u8]) -> Vec<u8> {
    decode_pages(data).to_bytes()
}

/// The same as [`decode`], straight into a page map: no dense copy of a file that is nearly all
/// zeros (a dense 16 MiB file per input cost more than the code under test).
pub fn decode_pages(data: &[u8]) -> Pages {
    if data.len() < 4 {
        return Pages::default();
    }
    // The top bit is a flag for the harness (see open_image), not part of the length.
    let len =
        u64::from(u32::from_le_bytes(data[..4].try_into().unwrap()) & 0x7fff_ffff).min(MAX_FILE);
    let mut file = Pages::zeros(len);
    let mut rest = &data[4..];
    while rest.len() >= 4 {
        let page = u64::from(u16::from_le_bytes([rest[0], rest[1]]));
        let n = usize::from(u16::from_le_bytes([rest[2], rest[3]]))
            .min(PAGE)
            .min(rest.len() - 4);
        let bytes = &rest[4..4 + n];
        rest = &rest[4 + n..];
        let at = page * PAGE as u64;
        if at < len {
            let n = (n as u64).min(len - at) as usize;
            // A record replaces the start of its page, as in a dense file: the rest of the
            // page keeps what an earlier record put there.
            file.write(&bytes[..n], at);
        }
    }
    file
}

/// The inverse, for seeds: every page that is not all zeros, trimmed of trailing zeros.
pub fn encode(file: &[u8]) -> Vec<u8> {
    let len = (file.len() as u64).min(MAX_FILE) as usize;
    let mut out = (len as u32).to_le_bytes().to_vec();
    for (page, bytes) in file[..len].chunks(PAGE).enumerate() {
        let n = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if n > 0 {
            out.extend((page as u16).to_le_bytes());
            out.extend((n as u16).to_le_bytes());
            out.extend(&bytes[..n]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let mut f = vec![0u8; 5 * 4096 + 100];
        f[3] = 1;
        f[4096 * 2 + 4095] = 2;
        f[5 * 4096 + 99] = 3;
        assert_eq!(super::decode(&super::encode(&f)), f);
        // Records of the same page: the last one wins where it reaches, zeros included.
        let data = [
            &[16u8, 0, 0, 0][..],
            &[0, 0, 3, 0, 1, 2, 3],
            &[0, 0, 2, 0, 0, 9],
        ]
        .concat();
        assert_eq!(
            super::decode(&data),
            [0u8, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
