//! The parent locator metadata item ([MS-VHDX] §2.6.2.6): UTF-16LE key/value pairs that say
//! where a differencing file's parent is and which DataWriteGuid it must have.

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use super::error::{Corruption, Error, Result};
use super::format::*;

pub const KEY_PARENT_LINKAGE: &str = "parent_linkage";
pub const KEY_PARENT_LINKAGE2: &str = "parent_linkage2";
pub const KEY_RELATIVE_PATH: &str = "relative_path";
pub const KEY_VOLUME_PATH: &str = "volume_path";
pub const KEY_ABSOLUTE_WIN32_PATH: &str = "absolute_win32_path";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// Key/value pairs in file order.
    pub entries: Vec<(String, String)>,
}

fn bad(reason: impl Into<String>) -> Error {
    Corruption::BadParentLocator(reason.into()).into()
}

fn utf16le(bytes: &[u8], what: &str) -> Result<String> {
    if bytes.len() % 2 != 0 {
        return Err(bad(format!(
            "{what} has an odd byte length {}",
            bytes.len()
        )));
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let s = String::from_utf16(&units).map_err(|_| bad(format!("{what} is not valid UTF-16")))?;
    if s.contains('\0') {
        return Err(bad(format!("{what} contains a NUL character")));
    }
    Ok(s)
}

/// Parses `{83ed0ec3-…}`, case-insensitively, with or without braces.
pub fn parse_guid_string(s: &str) -> Option<Uuid> {
    let inner = s
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(s);
    if inner.len() != 36 {
        return None;
    }
    Uuid::parse_str(inner).ok()
}

pub fn format_guid_string(g: Uuid) -> String {
    format!("{{{}}}", g.hyphenated())
}

impl ParentLocator {
    pub fn parse(item: &[u8]) -> Result<ParentLocator> {
        let (header, _) = ParentLocatorHeader::read_from_prefix(item).map_err(|_| {
            bad(format!(
                "item is {} bytes, shorter than its header",
                item.len()
            ))
        })?;
        let locator_type = guid_from_disk(header.locator_type);
        if locator_type != VHDX_LOCATOR_TYPE_GUID {
            return Err(Error::Unsupported(format!(
                "parent locator type {locator_type} (only VHDX parents are defined)"
            )));
        }
        let count = usize::from(header.key_value_count.get());
        let table_end = 20 + count * 12;
        if table_end > item.len() {
            return Err(bad(format!(
                "{count} entries do not fit in an item of {} bytes",
                item.len()
            )));
        }
        let mut entries: Vec<(String, String)> = Vec::with_capacity(count);
        for i in 0..count {
            let e = ParentLocatorEntry::read_from_prefix(&item[20 + i * 12..])
                .expect("bounds checked")
                .0;
            let slice = |off: u32, len: u16, what: &str| -> Result<&[u8]> {
                let (off, len) = (off as usize, usize::from(len));
                if off == 0 || len == 0 || off.checked_add(len).is_none_or(|end| end > item.len()) {
                    return Err(bad(format!(
                        "entry {i}: {what} at {off} length {len} is empty or outside the item"
                    )));
                }
                Ok(&item[off..off + len])
            };
            let key = utf16le(
                slice(e.key_offset.get(), e.key_length.get(), "key")?,
                "a key",
            )?;
            let value = utf16le(
                slice(e.value_offset.get(), e.value_length.get(), "value")?,
                &format!("the value of {key:?}"),
            )?;
            entries.push((key, value));
        }
        // Sorted, a repeated key sits next to itself: O(n log n) for up to 65,535 keys (a
        // pairwise check took seconds on every open).
        let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(bad(format!("key {:?} appears twice", pair[0])));
        }
        let locator = ParentLocator { entries };
        let linkage = locator
            .get(KEY_PARENT_LINKAGE)
            .ok_or_else(|| bad("parent_linkage is missing"))?;
        if parse_guid_string(linkage).is_none() {
            return Err(bad(format!("parent_linkage {linkage:?} is not a GUID")));
        }
        if let Some(l2) = locator.get(KEY_PARENT_LINKAGE2) {
            if parse_guid_string(l2).is_none() {
                return Err(bad(format!("parent_linkage2 {l2:?} is not a GUID")));
            }
        }
        if ![KEY_RELATIVE_PATH, KEY_VOLUME_PATH, KEY_ABSOLUTE_WIN32_PATH]
            .iter()
            .any(|k| locator.get(k).is_some())
        {
            return Err(bad("no relative_path, volume_path or absolute_win32_path"));
        }
        Ok(locator)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The DataWriteGuids a parent may have: parent_linkage and, if present, parent_linkage2.
    pub fn linkages(&self) -> Vec<Uuid> {
        [KEY_PARENT_LINKAGE, KEY_PARENT_LINKAGE2]
            .iter()
            .filter_map(|k| self.get(k).and_then(parse_guid_string))
            .collect()
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let count = self.entries.len();
        let mut strings = Vec::new();
        let mut table = Vec::new();
        let base = 20 + count * 12;
        let mut encode = |s: &str| -> (u32, u16) {
            let off = base + strings.len();
            let bytes: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let len = bytes.len();
            strings.extend_from_slice(&bytes);
            (off as u32, len as u16)
        };
        for (k, v) in &self.entries {
            if k.is_empty() || v.is_empty() || k.len() > 16384 || v.len() > 16384 {
                return Err(Error::InvalidArgument(format!(
                    "parent locator entry {k:?} is empty or too long"
                )));
            }
            let (ko, kl) = encode(k);
            let (vo, vl) = encode(v);
            table.push(ParentLocatorEntry {
                key_offset: U32::new(ko),
                value_offset: U32::new(vo),
                key_length: U16::new(kl),
                value_length: U16::new(vl),
            });
        }
        let header = ParentLocatorHeader {
            locator_type: guid_to_disk(VHDX_LOCATOR_TYPE_GUID),
            reserved: U16::new(0),
            key_value_count: U16::new(count as u16),
        };
        let mut out = header.as_bytes().to_vec();
        for e in &table {
            out.extend_from_slice(e.as_bytes());
        }
        out.extend_from_slice(&strings);
        if out.len() > METADATA_ITEM_MAX_LENGTH as usize {
            return Err(Error::InvalidArgument("parent locator too large".into()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ParentLocator {
        ParentLocator {
            entries: vec![
                (
                    KEY_PARENT_LINKAGE.into(),
                    "{83ED0EC3-24C8-49A6-A959-5E4BF1288BFB}".into(),
                ),
                (KEY_RELATIVE_PATH.into(), r"..\base\parent.vhdx".into()),
            ],
        }
    }

    #[test]
    fn round_trip_and_case_insensitive_linkage() {
        let l = sample();
        let parsed = ParentLocator::parse(&l.to_bytes().unwrap()).unwrap();
        assert_eq!(parsed, l);
        assert_eq!(
            parsed.linkages(),
            vec![Uuid::from_u128(0x83ed0ec3_24c8_49a6_a959_5e4bf1288bfb)]
        );
    }

    #[test]
    fn value_outside_the_item_is_refused() {
        let mut bytes = sample().to_bytes().unwrap();
        // Entry 0's value offset → far past the end.
        bytes[20 + 4..20 + 8].copy_from_slice(&5000u32.to_le_bytes());
        let err = ParentLocator::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("outside the item"), "{err}");
    }

    #[test]
    fn missing_linkage_is_refused() {
        let l = ParentLocator {
            entries: vec![(KEY_RELATIVE_PATH.into(), "p.vhdx".into())],
        };
        let err = ParentLocator::parse(&l.to_bytes().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("parent_linkage is missing"),
            "{err}"
        );
    }

    #[test]
    fn repeated_key_is_refused() {
        let mut l = sample();
        l.entries
            .push((KEY_RELATIVE_PATH.into(), "other.vhdx".into()));
        let err = ParentLocator::parse(&l.to_bytes().unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("key \"relative_path\" appears twice"),
            "{err}"
        );
    }

    #[test]
    fn count_larger_than_item_is_refused() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[18..20].copy_from_slice(&60000u16.to_le_bytes());
        assert!(ParentLocator::parse(&bytes).is_err());
    }
}
