//! The byte-level vocabulary of trace files: the magic, the version, sections with CRC-32 checksums,
//! little-endian fixed-width integers and LEB128 varints, and a decoder that knows its absolute offset
//! so that every error names where in the file it happened and what was expected there.
//! `traces/FORMAT.md` is the specification; this file and `write.rs` / `read.rs` implement it.

use super::TraceError;

/// The first eight bytes of every trace file.
pub const MAGIC: [u8; 8] = *b"WAFERTRC";
/// Bumped whenever a reader of the previous version would misread a file of the new one.
pub const FORMAT_VERSION: u16 = 1;
/// Section tags, in the order they appear.
pub const SECTIONS: [[u8; 4]; 6] = [*b"HEAD", *b"GEOM", *b"SERS", *b"FRMS", *b"SPAN", *b"DONE"];
/// Bytes a section adds around its payload: tag, u64 length, u32 CRC.
pub const SECTION_OVERHEAD: u64 = 4 + 8 + 4;
/// The largest quantised value: a fraction of 1 is stored as 255.
pub const Q_MAX: u64 = 255;

pub fn tag_name(tag: &[u8]) -> String {
    tag.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
}

/// An encoder into a growing buffer.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    pub fn var(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(b);
                return;
            }
            self.buf.push(b | 0x80);
        }
    }
    pub fn str(&mut self, s: &str) {
        self.var(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// Appends a whole section: tag, payload length, payload, CRC-32 of the payload.
    pub fn section(&mut self, tag: [u8; 4], payload: &[u8]) {
        self.bytes(&tag);
        self.u64(payload.len() as u64);
        self.bytes(payload);
        self.u32(crc32(payload));
    }
}

/// Bytes of `v` as a varint.
pub fn var_len(v: u64) -> u64 {
    (64 - (v | 1).leading_zeros() as u64).div_ceil(7)
}

/// A decoder over part of a file; offsets in errors are absolute.
pub struct Dec<'a> {
    data: &'a [u8],
    pos: usize,
    /// Absolute offset of `data[0]` in the file.
    base: u64,
    pub path: &'a str,
}

type R<T> = Result<T, TraceError>;

impl<'a> Dec<'a> {
    pub fn new(data: &'a [u8], base: u64, path: &'a str) -> Dec<'a> {
        Dec { data, pos: 0, base, path }
    }
    /// Absolute offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    pub fn truncated(&self, expected: impl Into<String>) -> TraceError {
        TraceError::Truncated {
            path: self.path.to_string(),
            offset: self.base + self.data.len() as u64,
            expected: expected.into(),
        }
    }
    pub fn corrupt_at(&self, offset: u64, expected: impl Into<String>, found: impl Into<String>) -> TraceError {
        TraceError::Corrupt { path: self.path.to_string(), offset, expected: expected.into(), found: found.into() }
    }
    pub fn take(&mut self, n: usize, what: &str) -> R<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.truncated(format!("{n} bytes of {what} at offset {}", self.offset())));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self, what: &str) -> R<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &str) -> R<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, what: &str) -> R<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &str) -> R<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A finite f64.
    pub fn f64(&mut self, what: &str) -> R<f64> {
        let at = self.offset();
        let v = f64::from_bits(self.u64(what)?);
        if !v.is_finite() {
            return Err(self.corrupt_at(at, format!("{what} (a finite number)"), format!("{v}")));
        }
        Ok(v)
    }
    pub fn bool(&mut self, what: &str) -> R<bool> {
        let at = self.offset();
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.corrupt_at(at, format!("{what} (0 or 1)"), format!("{b}"))),
        }
    }
    pub fn var(&mut self, what: &str) -> R<u64> {
        let at = self.offset();
        let mut v = 0u64;
        for i in 0..10 {
            let b = match self.u8(what) {
                Ok(b) => b,
                Err(_) => return Err(self.truncated(format!("the varint {what} starting at offset {at}"))),
            };
            if i == 9 && b > 1 {
                break;
            }
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt_at(at, format!("{what} (a varint of at most 64 bits)"), "a longer varint"))
    }
    /// A varint that must be at most `max`.
    pub fn var_max(&mut self, what: &str, max: u64) -> R<u64> {
        let at = self.offset();
        let v = self.var(what)?;
        if v > max {
            return Err(self.corrupt_at(at, format!("{what} of at most {max}"), format!("{v}")));
        }
        Ok(v)
    }
    /// A varint that must fit u32 (and at least `min`).
    pub fn var_u32(&mut self, what: &str, min: u32) -> R<u32> {
        let at = self.offset();
        let v = self.var(what)?;
        if v < min as u64 || v > u32::MAX as u64 {
            return Err(self.corrupt_at(at, format!("{what} between {min} and {}", u32::MAX), format!("{v}")));
        }
        Ok(v as u32)
    }
    /// A count of items that each take at least `min_bytes` bytes: bounded by what is left, so a corrupt
    /// count never makes the reader allocate more than the file holds.
    pub fn count(&mut self, what: &str, min_bytes: usize) -> R<usize> {
        let at = self.offset();
        let v = self.var(what)?;
        let max = (self.remaining() / min_bytes.max(1)) as u64;
        if v > max {
            return Err(self.corrupt_at(
                at,
                format!("{what} of at most {max} (the bytes left in the section)"),
                format!("{v}"),
            ));
        }
        Ok(v as usize)
    }
    pub fn str(&mut self, what: &str) -> R<String> {
        let n = self.count(&format!("the length of {what}"), 1)?;
        let at = self.offset();
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|e| self.corrupt_at(at, format!("{what} in UTF-8"), e.to_string()))
    }
    /// Fails unless every byte was read.
    pub fn finish(&self, what: &str) -> R<()> {
        if self.remaining() != 0 {
            return Err(self.corrupt_at(
                self.offset(),
                format!("the end of {what}"),
                format!("{} more bytes", self.remaining()),
            ));
        }
        Ok(())
    }
}

/// CRC-32 (IEEE 802.3, the zlib/PNG polynomial).
pub fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut e = Enc::default();
            e.var(v);
            assert_eq!(e.buf.len() as u64, var_len(v));
            let mut d = Dec::new(&e.buf, 0, "t");
            assert_eq!(d.var("v").unwrap(), v);
        }
        let bad = [0xffu8; 11];
        let err = Dec::new(&bad, 100, "t").var("x").unwrap_err().to_string();
        assert!(err.contains("offset 100"), "{err}");
        let short = [0x80u8];
        let err = Dec::new(&short, 7, "t").var("x").unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains("offset 8"), "{err}");
    }
}
