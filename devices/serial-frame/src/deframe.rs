//! Finding frames in a byte stream: everything between two `0x00` delimiters is one
//! encoded frame. The buffer is fixed, so a run longer than it (noise, or a frame
//! whose delimiter was lost) is dropped up to the next delimiter and reported once;
//! the frames after it are read normally.

/// What a byte completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Deframed<'a> {
    /// One encoded frame, without its delimiter, ready for [`decode`](crate::decode)
    /// (which decodes it in place, hence `mut`).
    Frame(&'a mut [u8]),
    /// A run of more than `N` bytes without a delimiter; it is being discarded up to
    /// the next delimiter. Count it as noise or an oversized frame.
    Oversize,
}

/// Splits a byte stream into encoded frames, in an `N`-byte buffer. With
/// `N` = [`MAX_ENCODED_LEN`](crate::MAX_ENCODED_LEN) it takes every frame the
/// specification allows and nothing longer.
#[derive(Debug, Clone)]
pub struct Deframer<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// The current run overflowed and was reported; drop bytes until a delimiter.
    discarding: bool,
}

impl<const N: usize> Deframer<N> {
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            discarding: false,
        }
    }

    /// Takes one byte. Returns a frame when the byte is the delimiter that ends one,
    /// [`Deframed::Oversize`] when the byte overflows the buffer, and nothing
    /// otherwise (empty frames, from repeated delimiters, are nothing).
    pub fn push(&mut self, byte: u8) -> Option<Deframed<'_>> {
        if byte == 0 {
            let len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.discarding) || len == 0 {
                return None;
            }
            return self.buf.get_mut(..len).map(Deframed::Frame);
        }
        if self.discarding {
            return None;
        }
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = byte;
                self.len += 1;
                None
            }
            None => {
                self.len = 0;
                self.discarding = true;
                Some(Deframed::Oversize)
            }
        }
    }

    /// Takes a run of bytes, calling `on` for each frame or overflow in order.
    pub fn feed(&mut self, bytes: &[u8], mut on: impl FnMut(Deframed<'_>)) {
        for &byte in bytes {
            if let Some(event) = self.push(byte) {
                on(event);
            }
        }
    }

    /// Drops a partial frame (after a line break, a baud-rate change, a reset of the
    /// peer).
    pub fn clear(&mut self) {
        self.len = 0;
        self.discarding = false;
    }
}

impl<const N: usize> Default for Deframer<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Frame(Vec<u8>),
        Oversize,
    }

    fn run<const N: usize>(deframer: &mut Deframer<N>, bytes: &[u8]) -> Vec<Seen> {
        let mut seen = Vec::new();
        deframer.feed(bytes, |event| {
            seen.push(match event {
                Deframed::Frame(frame) => Seen::Frame(frame.to_vec()),
                Deframed::Oversize => Seen::Oversize,
            })
        });
        seen
    }

    #[test]
    fn frames_end_at_each_delimiter() {
        let mut d = Deframer::<8>::new();
        assert_eq!(
            run(&mut d, &[1, 2, 0, 3, 0]),
            [Seen::Frame([1, 2].into()), Seen::Frame([3].into())]
        );
    }

    #[test]
    fn empty_frames_are_ignored() {
        let mut d = Deframer::<8>::new();
        assert_eq!(run(&mut d, &[0, 0, 5, 0, 0]), [Seen::Frame([5].into())]);
    }

    #[test]
    fn a_frame_may_arrive_in_pieces() {
        let mut d = Deframer::<8>::new();
        assert!(run(&mut d, &[1, 2]).is_empty());
        assert_eq!(run(&mut d, &[3, 0]), [Seen::Frame([1, 2, 3].into())]);
    }

    #[test]
    fn a_frame_filling_the_buffer_exactly_is_taken() {
        let mut d = Deframer::<4>::new();
        assert_eq!(
            run(&mut d, &[1, 2, 3, 4, 0]),
            [Seen::Frame([1, 2, 3, 4].into())]
        );
    }

    #[test]
    fn an_overlong_run_is_reported_once_and_dropped_to_the_next_delimiter() {
        let mut d = Deframer::<4>::new();
        let mut stream = std::vec![9u8; 50];
        stream.extend([0, 7, 0]);
        assert_eq!(
            run(&mut d, &stream),
            [Seen::Oversize, Seen::Frame([7].into())]
        );
    }

    #[test]
    fn noise_between_frames_is_skipped() {
        // Noise that ends in a delimiter costs one junk frame (refused by decode) and
        // leaves the next frame intact.
        let mut d = Deframer::<8>::new();
        assert_eq!(
            run(&mut d, &[0x55, 0xAA, 0, 1, 2, 0]),
            [Seen::Frame([0x55, 0xAA].into()), Seen::Frame([1, 2].into())]
        );
    }

    #[test]
    fn clear_drops_a_partial_frame() {
        let mut d = Deframer::<4>::new();
        run(&mut d, &[1, 2, 3, 4, 5]);
        d.clear();
        assert_eq!(run(&mut d, &[6, 0]), [Seen::Frame([6].into())]);
    }
}
