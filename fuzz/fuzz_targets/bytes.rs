//! The fuzz targets' input reader: draws small decisions from the input bytes, then zeros
//! once they run out. Each target uses the draws it needs.
#![allow(dead_code)]

pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, at: 0 }
    }

    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// In `0..n` (`n >= 1`).
    pub fn below(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }

    /// [`Bytes::below`] for the C ABI's `u32` fields.
    pub fn below_u32(&mut self, n: u32) -> u32 {
        self.below(n as usize) as u32
    }

    /// A count or position: usually small, sometimes near `usize::MAX`.
    pub fn count(&mut self) -> usize {
        match self.byte() {
            250 => usize::MAX,
            251 => usize::MAX - self.below(64),
            252 => 1 << 40,
            b => b as usize % 40,
        }
    }

    /// Usually below 24, sometimes any `u32`.
    pub fn word(&mut self) -> u32 {
        if self.byte() == 255 {
            u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
        } else {
            self.byte() as u32 % 24
        }
    }

    /// A value in `[-8, 8)` in steps of 1/16; raw bits (NaN, inf, huge, subnormal) now and then.
    pub fn value(&mut self) -> f32 {
        let b = self.byte();
        if b == 255 {
            f32::from_bits(u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()]))
        } else {
            (b as f32 - 127.0) / 16.0
        }
    }

    /// True one time in 16: pass NULL instead of a valid pointer.
    pub fn null(&mut self) -> bool {
        self.byte() % 16 == 0
    }

    pub fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}
