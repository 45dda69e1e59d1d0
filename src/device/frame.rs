//! One picture of the 64×32 board and the ways it leaves the process: hex
//! for `GET /api/frame`, raw RGB for the drivers, and the compact encodings
//! of the live stream on topic `device.frame` (documented in
//! `docs/protocol.md`, "The live frame stream").

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

pub const WIDTH: usize = 64;
pub const HEIGHT: usize = 32;

/// The topic of the live frame stream. Never a history topic, whatever
/// `HISTORY_TOPICS` says: a frame is stale the moment the next one exists,
/// and 20 frames a second would push every other publication out of a
/// replay.
pub const TOPIC: &str = "device.frame";

/// The refusal of a client or API publication on [`TOPIC`]: only the
/// leader's show, fenced by its epoch, draws the board's live picture.
pub const PUBLISH_REFUSAL: &str = "topic \"device.frame\" carries the board's live picture: only the device's leader publishes on it";

/// The event name of every publication on [`TOPIC`].
pub const EVENT: &str = "frame";

/// A run of the `runs` encoding covers at most this many pixels (one byte
/// holds the length − 1).
const MAX_RUN: usize = 256;

/// RGB pixels, row by row from the top left.
#[derive(Debug, Clone)]
pub struct Frame {
    pixels: Vec<[u8; 3]>,
}

/// Compares the bytes at once (the show compares every frame with the last
/// one streamed, `DEVICE_FPS` times a second).
impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.rgb() == other.rgb()
    }
}

impl Eq for Frame {}

impl Default for Frame {
    fn default() -> Self {
        Self::black()
    }
}

impl Frame {
    pub fn black() -> Frame {
        Frame {
            pixels: vec![[0; 3]; WIDTH * HEIGHT],
        }
    }

    pub fn pixels(&self) -> &[[u8; 3]] {
        &self.pixels
    }

    pub fn pixels_mut(&mut self) -> &mut [[u8; 3]] {
        &mut self.pixels
    }

    /// `WIDTH × HEIGHT × 3` bytes, as the LED protocols carry them.
    pub fn rgb(&self) -> &[u8] {
        self.pixels.as_flattened()
    }

    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        self.pixels[y * WIDTH + x]
    }

    /// Pixels that are not black.
    pub fn lit(&self) -> usize {
        self.pixels
            .iter()
            .filter(|[r, g, b]| (r | g | b) != 0)
            .count()
    }

    /// Lowercase hex of [`Frame::rgb`] (`GET /api/frame`).
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.pixels.len() * 6);
        for byte in self.rgb() {
            out.push(DIGITS[(byte >> 4) as usize] as char);
            out.push(DIGITS[(byte & 0xf) as usize] as char);
        }
        out
    }

    /// The frame in the stream's compact form: `runs` (a palette and
    /// run lengths, a few hundred bytes for text on black) when the frame
    /// has at most 256 colors, else `rgb` (base64 of the raw bytes).
    pub fn encode(&self) -> Encoded {
        let mut palette: Vec<[u8; 3]> = Vec::new();
        let mut runs: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < self.pixels.len() {
            let color = self.pixels[i];
            let mut len = 1;
            while len < MAX_RUN && i + len < self.pixels.len() && self.pixels[i + len] == color {
                len += 1;
            }
            let index = match palette.iter().position(|c| *c == color) {
                Some(index) => index,
                None if palette.len() < 256 => {
                    palette.push(color);
                    palette.len() - 1
                }
                None => return Encoded::Rgb(BASE64.encode(self.rgb())),
            };
            runs.push((len - 1) as u8);
            runs.push(index as u8);
            i += len;
        }
        Encoded::Runs {
            palette: palette.iter().map(|c| hex_color(*c)).collect(),
            runs: BASE64.encode(&runs),
        }
    }
}

/// [`Frame::encode`]'s result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// `palette`: colors as `rrggbb`; `runs`: base64 of byte pairs
    /// `[length − 1, palette index]` covering the frame row by row.
    Runs { palette: Vec<String>, runs: String },
    /// base64 of the `WIDTH × HEIGHT × 3` RGB bytes.
    Rgb(String),
}

impl Encoded {
    /// Adds the encoding's fields to a stream frame object.
    pub fn write_into(self, obj: &mut Value) {
        match self {
            Encoded::Runs { palette, runs } => {
                obj["encoding"] = json!("runs");
                obj["palette"] = json!(palette);
                obj["runs"] = json!(runs);
            }
            Encoded::Rgb(pixels) => {
                obj["encoding"] = json!("rgb");
                obj["pixels"] = json!(pixels);
            }
        }
    }
}

fn hex_color(c: [u8; 3]) -> String {
    format!("{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Decodes a stream frame (`encoding`, `palette`/`runs` or `pixels`), for
/// tests and tools; `None` when it is not a whole, well-formed frame.
pub fn decode(data: &Value) -> Option<Frame> {
    let mut frame = Frame::black();
    match data["encoding"].as_str()? {
        "rgb" => {
            let bytes = BASE64.decode(data["pixels"].as_str()?).ok()?;
            if bytes.len() != WIDTH * HEIGHT * 3 {
                return None;
            }
            for (p, c) in frame.pixels.iter_mut().zip(bytes.chunks_exact(3)) {
                *p = [c[0], c[1], c[2]];
            }
        }
        "runs" => {
            let palette: Vec<[u8; 3]> = data["palette"]
                .as_array()?
                .iter()
                .map(|c| {
                    let c = c.as_str()?;
                    let v = u32::from_str_radix(c, 16).ok().filter(|_| c.len() == 6)?;
                    Some([(v >> 16) as u8, (v >> 8) as u8, v as u8])
                })
                .collect::<Option<_>>()?;
            let runs = BASE64.decode(data["runs"].as_str()?).ok()?;
            let mut at = 0;
            for pair in runs.chunks(2) {
                let [len, index] = pair else { return None };
                let color = *palette.get(*index as usize)?;
                let end = at + *len as usize + 1;
                frame.pixels.get_mut(at..end)?.fill(color);
                at = end;
            }
            if at != WIDTH * HEIGHT {
                return None;
            }
        }
        _ => return None,
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_with(points: &[(usize, usize, [u8; 3])]) -> Frame {
        let mut f = Frame::black();
        for (x, y, c) in points {
            f.pixels_mut()[y * WIDTH + x] = *c;
        }
        f
    }

    #[test]
    fn hex_is_row_major_rgb() {
        let f = frame_with(&[(0, 0, [0, 16, 255]), (1, 0, [1, 2, 3])]);
        assert!(f.hex().starts_with("0010ff010203000000"));
        assert_eq!(f.hex().len(), WIDTH * HEIGHT * 6);
    }

    #[test]
    fn runs_round_trip_and_stay_small() {
        let f = frame_with(&[
            (3, 0, [255, 0, 0]),
            (4, 0, [255, 0, 0]),
            (63, 31, [1, 2, 3]),
        ]);
        let enc = f.encode();
        let Encoded::Runs { palette, runs } = &enc else {
            panic!("{enc:?}")
        };
        assert_eq!(palette, &["000000", "ff0000", "010203"]);
        // 3 black, 2 red, 2042 black (8 full runs of 256 would be 2048), 1 color.
        let bytes = BASE64.decode(runs).unwrap();
        assert_eq!(&bytes[..4], &[2, 0, 1, 1]);
        assert_eq!(bytes.len() % 2, 0);
        let mut obj = json!({});
        enc.write_into(&mut obj);
        assert_eq!(decode(&obj), Some(f));
    }

    #[test]
    fn more_than_256_colors_fall_back_to_rgb() {
        let mut f = Frame::black();
        for (i, p) in f.pixels_mut().iter_mut().enumerate() {
            *p = [(i % 256) as u8, (i / 256) as u8, 7];
        }
        let enc = f.encode();
        assert!(matches!(enc, Encoded::Rgb(_)));
        let mut obj = json!({});
        enc.write_into(&mut obj);
        assert_eq!(obj["encoding"], "rgb");
        assert_eq!(decode(&obj), Some(f));
    }

    #[test]
    fn malformed_stream_frames_are_refused() {
        for bad in [
            json!({}),
            json!({"encoding":"runs","palette":["000000"],"runs":"AAA="}),
            json!({"encoding":"runs","palette":["zz"],"runs":""}),
            json!({"encoding":"runs","palette":["000000"],"runs":BASE64.encode([255, 1])}),
            json!({"encoding":"rgb","pixels":"AAAA"}),
        ] {
            assert_eq!(decode(&bad), None, "{bad}");
        }
    }
}
