//! E1.31 (streaming ACN, "sACN", ANSI E1.31-2018), unicast: the frame goes
//! out as DMX512 data in consecutive universes, 170 RGB pixels (510 slots)
//! per universe so no pixel is split between two, 13 universes for the
//! 64×32 board. The packet layout comes from the `sacn` crate's `packet`
//! module; its `SacnSource` does not fit a leader that comes and goes (it
//! binds port 5568, so two nodes on one host collide, runs a thread that
//! prints to stdout, and sends with `send_to`, which never reports an
//! unreachable receiver), so the socket is the driver's own.

use std::borrow::Cow;
use std::io;

use sacn::packet::{
    AcnRootLayerProtocol, DataPacketDmpLayer, DataPacketFramingLayer, E131RootLayer,
    E131RootLayerData,
};
use uuid::Uuid;

use super::driver::Encoder;
use super::frame::{HEIGHT, WIDTH};

/// Pixels per universe: 510 of the 512 slots.
pub const PIXELS_PER_UNIVERSE: usize = 170;
/// Universes one frame takes.
pub const UNIVERSES: u16 = (WIDTH * HEIGHT).div_ceil(PIXELS_PER_UNIVERSE) as u16;
/// The highest universe number E1.31 allows.
pub const MAX_UNIVERSE: u16 = 63999;
/// The default priority of E1.31 sources.
const PRIORITY: u8 = 100;
/// DMX512 start code of dimmer data.
const START_CODE: u8 = 0;
/// How many stream-terminated packets per universe end a stream (6.2.6).
const TERMINATE_PACKETS: usize = 3;

/// One E1.31 source: a CID for its whole life, a sequence per universe.
/// A leadership term builds its own (a new CID, sequences from 0): a
/// receiver would drop a known source's packets whose sequence went back.
pub struct E131 {
    cid: Uuid,
    name: String,
    first: u16,
    sequences: Vec<u8>,
    /// Start code plus up to 510 slots.
    slots: Vec<u8>,
    buf: Vec<u8>,
}

impl E131 {
    /// A source named after `node` (cut to the field's 63 bytes) sending
    /// from universe `first` on.
    pub fn new(node: &str, first: u16) -> E131 {
        let mut name = format!("switchboard {node}");
        while name.len() > 63 {
            name.pop();
        }
        E131 {
            // A random (version 4) UUID, as E1.31 asks of a CID (RFC 4122).
            cid: uuid::Builder::from_random_bytes(rand::random()).into_uuid(),
            name,
            first,
            sequences: vec![0; UNIVERSES as usize],
            slots: Vec::with_capacity(1 + PIXELS_PER_UNIVERSE * 3),
            buf: vec![0; 638],
        }
    }

    fn universes(
        &mut self,
        rgb: &[u8],
        terminated: bool,
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        for (i, pixels) in rgb.chunks(PIXELS_PER_UNIVERSE * 3).enumerate() {
            self.slots.clear();
            self.slots.push(START_CODE);
            self.slots.extend_from_slice(pixels);
            let sequence = self.sequences[i];
            self.sequences[i] = sequence.wrapping_add(1);
            let packet = AcnRootLayerProtocol {
                pdu: E131RootLayer {
                    cid: self.cid,
                    data: E131RootLayerData::DataPacket(DataPacketFramingLayer {
                        source_name: Cow::Borrowed(&self.name),
                        priority: PRIORITY,
                        synchronization_address: 0,
                        sequence_number: sequence,
                        preview_data: false,
                        stream_terminated: terminated,
                        force_synchronization: false,
                        universe: self.first + i as u16,
                        data: DataPacketDmpLayer {
                            property_values: Cow::Borrowed(&self.slots),
                        },
                    }),
                },
            };
            let len = packet.len();
            packet
                .pack(&mut self.buf[..len])
                .map_err(|e| io::Error::other(format!("E1.31 packet not packed: {e}")))?;
            send(&self.buf[..len])?;
        }
        Ok(())
    }
}

impl Encoder for E131 {
    fn scheme(&self) -> &'static str {
        "e131"
    }

    fn frame(
        &mut self,
        rgb: &[u8],
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.universes(rgb, false, send)
    }

    /// Tells receivers the stream ends now (so they take the next leader's
    /// at once instead of after their 2.5 s data-loss timeout).
    fn finish(
        &mut self,
        rgb: &[u8],
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        for _ in 0..TERMINATE_PACKETS {
            self.universes(rgb, true, send)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a data packet by the offsets of ANSI E1.31-2018 section 4,
    /// independently of the crate that wrote it.
    fn read(p: &[u8]) -> (u16, u8, u8, Vec<u8>, String) {
        assert_eq!(&p[0..2], &[0x00, 0x10], "preamble size");
        assert_eq!(&p[4..16], b"ASC-E1.17\0\0\0");
        assert_eq!(&p[18..22], &[0, 0, 0, 4], "VECTOR_ROOT_E131_DATA");
        assert_eq!(&p[40..44], &[0, 0, 0, 2], "VECTOR_E131_DATA_PACKET");
        assert_eq!(
            u16::from_be_bytes([p[16], p[17]]) & 0x0fff,
            p.len() as u16 - 16
        );
        let name = String::from_utf8(
            p[44..108]
                .iter()
                .take_while(|b| **b != 0)
                .copied()
                .collect(),
        )
        .unwrap();
        assert_eq!(p[108], 100, "priority");
        let sequence = p[111];
        let options = p[112];
        let universe = u16::from_be_bytes([p[113], p[114]]);
        assert_eq!(p[117], 0x02, "VECTOR_DMP_SET_PROPERTY");
        assert_eq!(p[118], 0xa1);
        let count = u16::from_be_bytes([p[123], p[124]]) as usize;
        assert_eq!(p.len(), 125 + count);
        assert_eq!(p[125], 0, "start code");
        (universe, sequence, options, p[126..].to_vec(), name)
    }

    #[test]
    fn a_frame_fills_13_universes_of_170_pixels() {
        assert_eq!(UNIVERSES, 13);
        let rgb: Vec<u8> = (0..64 * 32 * 3).map(|i| (i % 253) as u8).collect();
        let mut src = E131::new("node-a", 7);
        let mut packets = Vec::new();
        for _ in 0..2 {
            src.frame(&rgb, &mut |p| {
                packets.push(p.to_vec());
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(packets.len(), 26);
        let mut rebuilt = Vec::new();
        for (i, p) in packets[..13].iter().enumerate() {
            let (universe, sequence, options, data, name) = read(p);
            assert_eq!(universe, 7 + i as u16);
            assert_eq!(sequence, 0);
            assert_eq!(options, 0);
            assert_eq!(name, "switchboard node-a");
            assert_eq!(data.len(), if i == 12 { 24 } else { 510 });
            rebuilt.extend(data);
        }
        assert_eq!(rebuilt, rgb);
        assert_eq!(
            read(&packets[13]).1,
            1,
            "each universe counts its own sequence"
        );
        assert_eq!(&packets[0][22..38], &packets[25][22..38], "one CID");
        // RFC 4122: version 4 in the high nibble of byte 6, variant 10xx in byte 8.
        let cid = &packets[0][22..38];
        assert_eq!(cid[6] >> 4, 4, "{cid:02x?}");
        assert_eq!(cid[8] >> 6, 0b10, "{cid:02x?}");
    }

    #[test]
    fn finish_sends_three_stream_terminated_packets_per_universe() {
        let mut src = E131::new(&"n".repeat(100), 1);
        let mut options = Vec::new();
        src.finish(&[0; 6144], &mut |p| {
            let (_, _, o, _, name) = read(p);
            assert_eq!(name.len(), 63);
            options.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(options.len(), 39);
        assert!(options.iter().all(|o| *o == 0x40));
    }
}
