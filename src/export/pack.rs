//! Signed integers packed to their bit width: `bits`-bit two's complement values, least significant
//! bits first, back to back across byte boundaries (two 4-bit values a byte; 3-bit values straddle
//! bytes). The packed length is ceil(n · bits / 8) bytes, the model's real size on disk.

/// Packs `values` (each in the signed range of `bits`, 2..=8) into bytes.
pub fn pack(values: &[i8], bits: u32) -> Vec<u8> {
    assert!((2..=8).contains(&bits), "pack: {bits} bits");
    let mask = (1u32 << bits) - 1;
    let mut out = vec![0u8; packed_len(values.len(), bits)];
    let (mut acc, mut filled, mut at) = (0u32, 0u32, 0usize);
    for &v in values {
        acc |= (v as i32 as u32 & mask) << filled;
        filled += bits;
        while filled >= 8 {
            out[at] = acc as u8;
            at += 1;
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out[at] = acc as u8;
    }
    out
}

/// Bytes that `n` values of `bits` bits pack into.
pub fn packed_len(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// The `n` values [`pack`] stored in `bytes`; None when `bytes` is not their packed length.
pub fn unpack(bytes: &[u8], bits: u32, n: usize) -> Option<Vec<i8>> {
    if !(2..=8).contains(&bits) || bytes.len() != packed_len(n, bits) {
        return None;
    }
    let mask = (1u32 << bits) - 1;
    let sign = 1u32 << (bits - 1);
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut filled) = (0u32, 0u32);
    let mut bytes = bytes.iter();
    for _ in 0..n {
        while filled < bits {
            acc |= (*bytes.next()? as u32) << filled;
            filled += 8;
        }
        let raw = acc & mask;
        acc >>= bits;
        filled -= bits;
        // Sign-extend from `bits`.
        out.push(((raw ^ sign) as i32 - sign as i32) as i8);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packing_round_trips_at_every_width(bits in 2u32..=8, raw in proptest::collection::vec(any::<i8>(), 0..300)) {
            let lo = -(1i32 << (bits - 1));
            let hi = (1i32 << (bits - 1)) - 1;
            let values: Vec<i8> = raw.iter().map(|&v| (v as i32).clamp(lo, hi) as i8).collect();
            let packed = pack(&values, bits);
            prop_assert_eq!(packed.len(), (values.len() * bits as usize).div_ceil(8));
            prop_assert_eq!(unpack(&packed, bits, values.len()), Some(values));
        }
    }

    #[test]
    fn four_bit_values_share_a_byte_low_nibble_first() {
        assert_eq!(pack(&[1, -1, 7], 4), vec![0xF1, 0x07]);
        assert_eq!(unpack(&[0xF1, 0x07], 4, 3), Some(vec![1, -1, 7]));
        // An odd count (a layer of 3x3x3 = 27 weights) ends in half a byte.
        assert_eq!(pack(&[-7; 27], 4).len(), 14);
        assert_eq!(unpack(&[0u8; 13], 4, 27), None, "too short");
        assert_eq!(unpack(&[0u8; 15], 4, 27), None, "too long");
    }
}
