//! Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999): the encoding that
//! leaves `0x00` free to mark the end of each frame on the wire.
//!
//! A code byte `k` in `1..=0xFE` is followed by `k - 1` data bytes and stands for a
//! zero after them; `0xFF` is followed by 254 data bytes and no zero. The zero implied
//! by the last block is not part of the data.
//!
//! Encoders differ on one detail: when the data ends with a block of exactly 254
//! non-zero bytes, some add an empty `0x01` block after it (they always close a last
//! block) and others do not. Both decode to the same bytes. [`encode`] writes the shorter form (the one
//! whose overhead is `ceil(n / 254)` bytes) and [`decode_in_place`] accepts both; the
//! tag covers the decoded bytes, so the choice carries no meaning.

use core::fmt;

/// Longest canonical COBS encoding of `n` bytes (one code byte per started block of
/// 254, and one for empty data).
pub const fn max_encoded_len(n: usize) -> usize {
    if n == 0 { 1 } else { n + n.div_ceil(254) }
}

/// The output buffer cannot hold the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferTooSmall {
    /// Bytes the encoding needs.
    pub needed: usize,
    /// Bytes the buffer has.
    pub available: usize,
}

impl fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "output buffer holds {} bytes; the encoding needs {}",
            self.available, self.needed
        )
    }
}

impl core::error::Error for BufferTooSmall {}

/// Why bytes are not a COBS encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CobsError {
    /// A `0x00` inside the encoding (it only ever ends one).
    ZeroByte { at: usize },
    /// The block whose code byte is at `at` runs past the end of the input.
    Truncated { at: usize },
}

impl fmt::Display for CobsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroByte { at } => write!(f, "COBS: a 0x00 byte at offset {at}"),
            Self::Truncated { at } => {
                write!(f, "COBS: the block at offset {at} runs past the end")
            }
        }
    }
}

impl core::error::Error for CobsError {}

/// Encodes `src` into `dst` (no delimiter) and returns the encoding's length.
pub fn encode(src: &[u8], dst: &mut [u8]) -> Result<usize, BufferTooSmall> {
    let mut encoder = Encoder::new(dst);
    encoder.push_all(src);
    encoder.finish()
}

/// Decodes one encoding (without its delimiter) in place and returns the length of
/// the data, which now starts at `buf[0]`.
pub fn decode_in_place(buf: &mut [u8]) -> Result<usize, CobsError> {
    let len = buf.len();
    let (mut read, mut write) = (0, 0);
    while let Some(&code) = buf.get(read) {
        if code == 0 {
            return Err(CobsError::ZeroByte { at: read });
        }
        let start = read + 1;
        let end = start + usize::from(code) - 1;
        let Some(run) = buf.get(start..end) else {
            return Err(CobsError::Truncated { at: read });
        };
        if let Some(zero) = run.iter().position(|&b| b == 0) {
            return Err(CobsError::ZeroByte { at: start + zero });
        }
        // `write` never passes `start`: every block shrinks by its code byte.
        buf.copy_within(start..end, write);
        write += end - start;
        read = end;
        if code != 0xFF && read < len {
            if let Some(slot) = buf.get_mut(write) {
                *slot = 0;
            }
            write += 1;
        }
    }
    Ok(write)
}

/// A streaming encoder, so a frame is encoded as it is serialised, with no second
/// buffer. Writes past the end of `out` are counted, not made, so
/// [`BufferTooSmall::needed`] is exact.
pub(crate) struct Encoder<'a> {
    out: &'a mut [u8],
    /// Next byte to write.
    pos: usize,
    /// Where the current block's code byte goes once the block is closed.
    code_at: usize,
    code: u8,
    /// The last byte closed a full (254-byte) block, so the code byte reserved after
    /// it is still empty.
    after_full_block: bool,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self {
            out,
            pos: 1,
            code_at: 0,
            code: 1,
            after_full_block: false,
        }
    }

    pub(crate) fn push(&mut self, byte: u8) {
        self.after_full_block = false;
        if byte == 0 {
            self.close_block();
            return;
        }
        self.put(self.pos, byte);
        self.pos += 1;
        self.code += 1;
        if self.code == 0xFF {
            self.close_block();
            self.after_full_block = true;
        }
    }

    pub(crate) fn push_all(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.push(byte);
        }
    }

    /// Closes the last block and returns the encoding's length.
    pub(crate) fn finish(mut self) -> Result<usize, BufferTooSmall> {
        let len = self.close();
        self.fits(len)
    }

    /// Closes the last block, appends the `0x00` delimiter and returns the length on
    /// the wire.
    pub(crate) fn finish_frame(mut self) -> Result<usize, BufferTooSmall> {
        let len = self.close();
        self.put(len, 0);
        self.fits(len + 1)
    }

    fn close(&mut self) -> usize {
        if self.after_full_block {
            // The shorter form: no empty block after a full one at the end.
            self.pos -= 1;
        } else {
            self.put(self.code_at, self.code);
        }
        self.pos
    }

    fn close_block(&mut self) {
        self.put(self.code_at, self.code);
        self.code_at = self.pos;
        self.pos += 1;
        self.code = 1;
    }

    fn put(&mut self, at: usize, byte: u8) {
        if let Some(slot) = self.out.get_mut(at) {
            *slot = byte;
        }
    }

    fn fits(&self, needed: usize) -> Result<usize, BufferTooSmall> {
        if needed <= self.out.len() {
            Ok(needed)
        } else {
            Err(BufferTooSmall {
                needed,
                available: self.out.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn encoded(src: &[u8]) -> Vec<u8> {
        let mut out = vec![0xAA; max_encoded_len(src.len()) + 8];
        let len = encode(src, &mut out).unwrap();
        out.truncate(len);
        out
    }

    fn decoded(enc: &[u8]) -> Result<Vec<u8>, CobsError> {
        let mut buf = enc.to_vec();
        let len = decode_in_place(&mut buf)?;
        buf.truncate(len);
        Ok(buf)
    }

    #[test]
    fn paper_examples_encode_as_published() {
        assert_eq!(encoded(&[]), [0x01]);
        assert_eq!(encoded(&[0x00]), [0x01, 0x01]);
        assert_eq!(encoded(&[0x00, 0x00]), [0x01, 0x01, 0x01]);
        assert_eq!(encoded(&[0x11, 0x22, 0x00, 0x33]), [3, 0x11, 0x22, 2, 0x33]);
        assert_eq!(encoded(&[0x11, 0x00, 0x00, 0x00]), [2, 0x11, 1, 1, 1]);
    }

    #[test]
    fn full_blocks_encode_as_the_common_examples_show() {
        // 01..FF: a full block, then a block for the last byte.
        let data: Vec<u8> = (1..=255).collect();
        let enc = encoded(&data);
        assert_eq!(enc[0], 0xFF);
        assert_eq!(enc[255..], [0x02, 0xFF]);
        // 02..FF then 00: a full block, the zero, and the empty last block.
        let mut data: Vec<u8> = (2..=255).collect();
        data.push(0);
        let enc = encoded(&data);
        assert_eq!(enc.len(), 257);
        assert_eq!(enc[0], 0xFF);
        assert_eq!(enc[255..], [0x01, 0x01]);
    }

    #[test]
    fn a_final_full_block_gets_no_empty_block_after_it() {
        let data: Vec<u8> = (1..=254).collect();
        let enc = encoded(&data);
        assert_eq!(enc.len(), 255);
        assert_eq!(enc[0], 0xFF);
        assert_eq!(enc.len(), max_encoded_len(data.len()));
        assert_eq!(decoded(&enc).unwrap(), data);
    }

    #[test]
    fn the_longer_form_with_an_empty_final_block_decodes_the_same() {
        let data: Vec<u8> = (1..=254).collect();
        let mut enc = encoded(&data);
        enc.push(0x01);
        assert_eq!(decoded(&enc).unwrap(), data);
    }

    #[test]
    fn a_full_block_followed_by_more_data_continues_without_a_zero() {
        let data: Vec<u8> = (0..600).map(|i| (i % 255 + 1) as u8).collect();
        let enc = encoded(&data);
        assert_eq!(enc.len(), 600 + 3);
        assert!(!enc.contains(&0));
        assert_eq!(decoded(&enc).unwrap(), data);
    }

    #[test]
    fn a_zero_inside_an_encoding_is_refused() {
        assert_eq!(decoded(&[0x00]), Err(CobsError::ZeroByte { at: 0 }));
        assert_eq!(
            decoded(&[0x03, 0x11, 0x00]),
            Err(CobsError::ZeroByte { at: 2 })
        );
    }

    #[test]
    fn a_block_running_past_the_end_is_refused() {
        assert_eq!(
            decoded(&[0x02, 0x11, 0x05, 0x22]),
            Err(CobsError::Truncated { at: 2 })
        );
    }

    #[test]
    fn too_small_a_buffer_reports_the_exact_need() {
        let data = [1u8, 2, 0, 3];
        let mut out = [0u8; 4];
        assert_eq!(
            encode(&data, &mut out),
            Err(BufferTooSmall {
                needed: 5,
                available: 4
            })
        );
        let mut out = [0u8; 5];
        assert_eq!(encode(&data, &mut out), Ok(5));
    }

    #[test]
    fn every_length_round_trips_and_stays_within_the_bound() {
        for len in 0..800usize {
            for zero_every in [0usize, 1, 3, 254, 255] {
                let data: Vec<u8> = (0..len)
                    .map(|i| {
                        if zero_every != 0 && i % zero_every == 0 {
                            0
                        } else {
                            (i % 251 + 1) as u8
                        }
                    })
                    .collect();
                let enc = encoded(&data);
                assert!(enc.len() <= max_encoded_len(len), "len {len}");
                assert!(!enc.contains(&0));
                assert_eq!(decoded(&enc).unwrap(), data, "len {len}");
            }
        }
    }
}
