//! DDP (Distributed Display Protocol, <http://www.3waylabs.com/ddp/>), the
//! protocol of WLED, xLights, FPP and ESPixelStick: a frame is written to
//! the display's buffer in packets of at most 1440 data bytes (480 RGB
//! pixels), the last one with the push flag, which shows the buffer.
//!
//! Why our own 40 lines and not `ddp-rs` (1.3): its sender numbers packets
//! 1..=16, and 16 sets a reserved bit of byte 1 (the spec says 1–15), and it
//! labels 8-bit RGB as data type 0x0D (24 bits per element) where the spec's
//! `SSS` is the size of one element (8 bits: 0x0B, what WLED calls
//! `DDP_TYPE_RGB24`); its socket sends with `send_to`, which never reports an
//! unreachable display. The packet layout is small enough to own and test.

use std::io;

use super::driver::Encoder;

/// Header flags: version 1.
const VERSION_1: u8 = 0x40;
/// Header flags: show the buffer now (set on a frame's last packet).
const PUSH: u8 = 0x01;
/// Data type `C R TTT SSS` = 0 0 001 011: standard RGB, 8 bits per element.
const RGB_8_BIT: u8 = 0x0B;
/// Destination ID 1: the display's default output.
const DEFAULT_OUTPUT: u8 = 1;
/// Data bytes per packet (480 RGB pixels), the protocol's usual maximum.
pub const MAX_DATA: usize = 1440;
pub const HEADER: usize = 10;

/// Numbers DDP packets; one per driver, for its whole life.
pub struct Ddp {
    /// 1–15, incremented with every packet.
    sequence: u8,
    buf: Box<[u8; HEADER + MAX_DATA]>,
}

impl Default for Ddp {
    fn default() -> Self {
        Ddp {
            sequence: 1,
            buf: Box::new([0; HEADER + MAX_DATA]),
        }
    }
}

impl Encoder for Ddp {
    fn scheme(&self) -> &'static str {
        "ddp"
    }

    fn frame(
        &mut self,
        rgb: &[u8],
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let chunks = rgb.len().div_ceil(MAX_DATA);
        for (i, chunk) in rgb.chunks(MAX_DATA).enumerate() {
            let b = &mut self.buf;
            b[0] = VERSION_1 | if i + 1 == chunks { PUSH } else { 0 };
            b[1] = self.sequence;
            b[2] = RGB_8_BIT;
            b[3] = DEFAULT_OUTPUT;
            b[4..8].copy_from_slice(&((i * MAX_DATA) as u32).to_be_bytes());
            b[8..10].copy_from_slice(&(chunk.len() as u16).to_be_bytes());
            b[HEADER..HEADER + chunk.len()].copy_from_slice(chunk);
            self.sequence = self.sequence % 15 + 1;
            send(&b[..HEADER + chunk.len()])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_split_at_1440_bytes_with_push_on_the_last() {
        let rgb: Vec<u8> = (0..64 * 32 * 3).map(|i| (i % 251) as u8).collect();
        let mut ddp = Ddp::default();
        let mut packets = Vec::new();
        ddp.frame(&rgb, &mut |p| {
            packets.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(packets.len(), 5, "6144 bytes = 4 × 1440 + 384");
        let mut rebuilt = vec![0u8; rgb.len()];
        for (i, p) in packets.iter().enumerate() {
            assert_eq!(p[0], if i == 4 { 0x41 } else { 0x40 });
            assert_eq!(p[1], i as u8 + 1);
            assert_eq!(&p[2..4], &[0x0B, 1]);
            let offset = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
            let len = u16::from_be_bytes(p[8..10].try_into().unwrap()) as usize;
            assert_eq!(offset, i * 1440);
            assert_eq!(len, p.len() - 10);
            assert_eq!(len, if i == 4 { 384 } else { 1440 });
            rebuilt[offset..offset + len].copy_from_slice(&p[10..]);
        }
        assert_eq!(rebuilt, rgb);
    }

    #[test]
    fn sequence_numbers_run_from_1_to_15() {
        let mut ddp = Ddp::default();
        let mut seen = Vec::new();
        for _ in 0..7 {
            ddp.frame(&[0; 6144], &mut |p| {
                seen.push(p[1]);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(seen.len(), 35);
        assert_eq!(
            &seen[..16],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 1]
        );
        assert!(seen.iter().all(|s| (1..=15).contains(s)));
    }

    #[test]
    fn a_send_error_stops_the_frame() {
        let mut ddp = Ddp::default();
        let mut n = 0;
        let err = ddp
            .frame(&[0; 6144], &mut |_| {
                n += 1;
                Err(io::Error::from(io::ErrorKind::ConnectionRefused))
            })
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(n, 1);
    }
}
