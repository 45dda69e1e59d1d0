//! What the board shows: a pure function of the device state and a time.
//!
//! The leader calls [`render`] at `DEVICE_FPS` for its drivers and the live
//! stream; every other node calls it for `GET /api/frame`. Times are
//! quantized to the frame rate ([`frame_time`]), so two nodes that render the
//! same state in the same frame slot draw the same pixels. Nothing here reads
//! a clock, the environment or the system's time-zone files (the tz database
//! is compiled in), which is what makes the frames unit-testable with fixed
//! times.
//!
//! Text is drawn with U8g2's bitmap fonts (`u8g2-fonts`) on an
//! `embedded-graphics` draw target: glyphs land exactly as the font defines
//! them, one color, no scaling or smoothing, so the clock can be read back
//! pixel for pixel.

use std::convert::Infallible;

use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::Value;
use u8g2_fonts::types::{FontColor, VerticalPosition};
use u8g2_fonts::{FontRenderer, fonts};

use super::frame::{Frame, HEIGHT, WIDTH};
use super::state::DeviceState;

// === fonts ===

/// The fonts an app's `font` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Font {
    /// Robey Pointer's tom-thumb: 3×5 glyphs in a 4×6 cell.
    TomThumb,
    /// X11 misc-fixed 6x10.
    Fixed6x10,
    /// X11 misc-fixed 10x20: digits 9 px wide, 13 px tall.
    Fixed10x20,
    /// X11 misc-fixed 9x15 bold.
    Fixed9x15Bold,
}

/// Canonical font names, as documented and listed in error messages.
pub const FONT_NAMES: &[&str] = &["tom-thumb", "6x10", "10x20", "9x15B"];

/// Names accepted for configs written before the real fonts existed.
const FONT_ALIASES: &[(&str, Font)] = &[
    ("small", Font::TomThumb),
    ("default", Font::Fixed6x10),
    ("large", Font::Fixed10x20),
    ("bold", Font::Fixed9x15Bold),
];

// The `_tf` variants hold Latin-1 (32–255); unknown characters are skipped.
const TOM_THUMB: FontRenderer =
    FontRenderer::new::<fonts::u8g2_font_tom_thumb_4x6_tf>().with_ignore_unknown_chars(true);
const FIXED_6X10: FontRenderer =
    FontRenderer::new::<fonts::u8g2_font_6x10_tf>().with_ignore_unknown_chars(true);
const FIXED_10X20: FontRenderer =
    FontRenderer::new::<fonts::u8g2_font_10x20_tf>().with_ignore_unknown_chars(true);
const FIXED_9X15B: FontRenderer =
    FontRenderer::new::<fonts::u8g2_font_9x15B_tf>().with_ignore_unknown_chars(true);

impl Font {
    /// A canonical name or an alias.
    pub fn from_name(name: &str) -> Option<Font> {
        let canonical = [
            Font::TomThumb,
            Font::Fixed6x10,
            Font::Fixed10x20,
            Font::Fixed9x15Bold,
        ];
        FONT_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| canonical[i])
            .or_else(|| {
                FONT_ALIASES
                    .iter()
                    .find(|(a, _)| *a == name)
                    .map(|(_, f)| *f)
            })
    }

    fn renderer(self) -> &'static FontRenderer {
        match self {
            Font::TomThumb => &TOM_THUMB,
            Font::Fixed6x10 => &FIXED_6X10,
            Font::Fixed10x20 => &FIXED_10X20,
            Font::Fixed9x15Bold => &FIXED_9X15B,
        }
    }
}

/// Whether `name` is a font of [`FONT_NAMES`] or an accepted alias.
pub fn is_font(name: &str) -> bool {
    Font::from_name(name).is_some()
}

/// Whether `name` is a time zone of the compiled-in tz database (`UTC`,
/// `Europe/Berlin`, …).
pub fn is_time_zone(name: &str) -> bool {
    name.len() <= 64 && TimeZone::get(name).is_ok()
}

// === time ===

/// The start of the frame slot `now_ms` (Unix milliseconds) falls in, at
/// `fps` frames a second. Every node maps the same moment to the same slot.
pub fn frame_time(now_ms: i64, fps: u32) -> i64 {
    let fps = i64::from(fps.max(1));
    let slot = (now_ms * fps).div_euclid(1000);
    (slot * 1000).div_euclid(fps)
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

// === the apps ===

/// The board for `state` at `t_ms` (Unix milliseconds).
pub fn render(state: &DeviceState, t_ms: i64) -> Frame {
    let config = state.config_of(&state.current_app);
    let mut canvas = Canvas(Frame::black());
    match state.current_app.as_str() {
        "clock" => clock(&mut canvas, &config, t_ms),
        "scroll_text" => scroll_text(&mut canvas, &config, t_ms),
        "stars" => stars(&mut canvas, &config, t_ms),
        other => {
            // An app without a renderer shows its name.
            let color = color(&config, [255, 255, 255]);
            centered(&mut canvas, Font::TomThumb, other, HEIGHT as i32 / 2, color);
        }
    }
    let mut frame = canvas.0;
    let brightness = u32::from(state.settings.brightness.min(100));
    for p in frame.pixels_mut() {
        *p = p.map(|v| (u32::from(v) * brightness / 100) as u8);
    }
    frame
}

/// Until when (Unix ms, exclusive) the frame rendered for `state` at `t_ms`
/// stays the same: the next local minute for the clock, the next slot
/// (`t_ms`) for what moves, never for what is static. The leader's show
/// skips rendering until then (an idle clock costs nothing 20 times a
/// second).
pub fn stable_until(state: &DeviceState, t_ms: i64) -> i64 {
    let config = state.config_of(&state.current_app);
    if state.settings.brightness == 0 {
        return i64::MAX;
    }
    match state.current_app.as_str() {
        "clock" => {
            let tz = time_zone(&config);
            let Ok(ts) = Timestamp::from_millisecond(t_ms) else {
                return t_ms;
            };
            let offset_ms = i64::from(tz.to_offset(ts).seconds()) * 1000;
            t_ms + 60_000 - (t_ms + offset_ms).rem_euclid(60_000)
        }
        "scroll_text" if config["text"].as_str().is_none_or(str::is_empty) => i64::MAX,
        "stars" if config["density"].as_u64() == Some(0) => i64::MAX,
        "scroll_text" | "stars" => t_ms,
        _ => i64::MAX,
    }
}

fn time_zone(config: &Value) -> TimeZone {
    config["timezone"]
        .as_str()
        .and_then(|n| TimeZone::get(n).ok())
        .unwrap_or(TimeZone::UTC)
}

/// `config.color` as `[r, g, b]`, or `default`.
fn color(config: &Value, default: [u8; 3]) -> [u8; 3] {
    let mut c = default;
    if let Some(a) = config["color"].as_array().filter(|a| a.len() == 3) {
        for (i, v) in a.iter().enumerate() {
            c[i] = v.as_u64().unwrap_or(u64::from(default[i])).min(255) as u8;
        }
    }
    c
}

fn font(config: &Value, default: Font) -> Font {
    config["font"]
        .as_str()
        .and_then(Font::from_name)
        .unwrap_or(default)
}

/// The time in `config.timezone` (UTC when absent), `HH:MM` (24 h) or `h:MM`
/// with `AM`/`PM` in tom-thumb underneath (12 h), centered.
fn clock(canvas: &mut Canvas, config: &Value, t_ms: i64) {
    let c = color(config, [255, 255, 255]);
    let f = font(config, Font::TomThumb);
    let tz = time_zone(config);
    let Ok(ts) = Timestamp::from_millisecond(t_ms) else {
        return;
    };
    let local = tz.to_datetime(ts);
    let (h, m) = (local.hour(), local.minute());
    let h24 = config["format_24h"].as_bool().unwrap_or(true);
    if h24 {
        centered(canvas, f, &format!("{h:02}:{m:02}"), HEIGHT as i32 / 2, c);
        return;
    }
    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
    let time = format!("{h12}:{m:02}");
    let half = if h < 12 { "AM" } else { "PM" };
    let (Some(tb), Some(hb)) = (bounds(f, &time), bounds(Font::TomThumb, half)) else {
        return;
    };
    let gap = 2;
    let total = tb.size.height as i32 + gap + hb.size.height as i32;
    let top = (HEIGHT as i32 - total) / 2;
    centered(canvas, f, &time, top + tb.size.height as i32 / 2, c);
    let half_top = top + tb.size.height as i32 + gap;
    centered(
        canvas,
        Font::TomThumb,
        half,
        half_top + hb.size.height as i32 / 2,
        c,
    );
}

/// `config.text` moving left at `config.speed` pixels a second: it enters at
/// the right edge, leaves at the left, and enters again.
fn scroll_text(canvas: &mut Canvas, config: &Value, t_ms: i64) {
    let c = color(config, [0, 255, 0]);
    let f = font(config, Font::Fixed6x10);
    let text: String = config["text"]
        .as_str()
        .unwrap_or("")
        .chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .collect();
    let speed = config["speed"].as_i64().unwrap_or(20).clamp(1, 100);
    let r = f.renderer();
    let Ok(dims) =
        r.get_rendered_dimensions(text.as_str(), Point::zero(), VerticalPosition::Baseline)
    else {
        return;
    };
    let width = i64::from(dims.advance.x.max(0));
    if width == 0 {
        return;
    }
    let cycle = WIDTH as i64 + width;
    let moved = (t_ms.rem_euclid(cycle * 1000) * speed / 1000).rem_euclid(cycle);
    let x = WIDTH as i64 - moved;
    let fb = r.get_font_bounding_box(VerticalPosition::Baseline);
    let baseline = (HEIGHT as i32 - fb.size.height as i32) / 2 - fb.top_left.y;
    draw(canvas, f, &text, Point::new(x as i32, baseline), c);
}

/// Stars at fixed places (`config.density`: 0 none … 100 = 30 % of the
/// pixels), each twinkling through 8 levels on its own period (1.2–4 s) and
/// phase.
fn stars(canvas: &mut Canvas, config: &Value, t_ms: i64) {
    let c = color(config, [255, 255, 0]);
    let density = config["density"].as_u64().unwrap_or(50).min(100) as u32;
    for (i, p) in canvas.0.pixels_mut().iter_mut().enumerate() {
        let h = mix(i as u32 ^ 0x9e37_79b9);
        if h % 1000 >= density * 3 {
            continue;
        }
        let h2 = mix(h);
        let period = 1200 + i64::from(h2 % 2800);
        let pos = (t_ms + i64::from(h2 >> 12)).rem_euclid(period);
        // A triangle wave: 8 near the ends of the period, 1 in the middle.
        let level = 1 + 8 * (2 * pos - period).abs() / (period + 1);
        *p = c.map(|v| (i64::from(v) * level / 8) as u8);
    }
}

/// A 32-bit integer hash (the "lowbias32" finalizer): the same sky on every
/// node and every run.
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

// === drawing ===

/// The frame as an `embedded-graphics` target; pixels outside are clipped.
struct Canvas(Frame);

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(WIDTH as u32, HEIGHT as u32)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Infallible>
    where
        I: IntoIterator<Item = Pixel<Rgb888>>,
    {
        for Pixel(p, c) in pixels {
            if let (Ok(x @ 0..WIDTH), Ok(y @ 0..HEIGHT)) =
                (usize::try_from(p.x), usize::try_from(p.y))
            {
                self.0.pixels_mut()[y * WIDTH + x] = [c.r(), c.g(), c.b()];
            }
        }
        Ok(())
    }
}

/// The box `text` covers when drawn with its baseline at the origin.
fn bounds(font: Font, text: &str) -> Option<Rectangle> {
    font.renderer()
        .get_rendered_dimensions(text, Point::zero(), VerticalPosition::Baseline)
        .ok()?
        .bounding_box
}

/// Draws `text` so its glyphs' box is centered horizontally and around row
/// `center_y`.
fn centered(canvas: &mut Canvas, font: Font, text: &str, center_y: i32, c: [u8; 3]) {
    let Some(b) = bounds(font, text) else { return };
    let x = (WIDTH as i32 - b.size.width as i32) / 2 - b.top_left.x;
    let y = center_y - b.size.height as i32 / 2 - b.top_left.y;
    draw(canvas, font, text, Point::new(x, y), c);
}

fn draw(canvas: &mut Canvas, font: Font, text: &str, baseline: Point, c: [u8; 3]) {
    let color = FontColor::Transparent(Rgb888::new(c[0], c[1], c[2]));
    // The canvas cannot fail and unknown glyphs are skipped: nothing to report.
    let _ = font
        .renderer()
        .render(text, baseline, VerticalPosition::Baseline, color, canvas);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::state::Command;
    use serde_json::json;

    /// 2026-12-02 13:45:30.250 UTC.
    const T: i64 = 1_796_219_130_250;

    fn state(app: &str, config: Value) -> DeviceState {
        let s = DeviceState::initial(&["clock".into(), "scroll_text".into(), "stars".into()]);
        let (s, _) = s.apply(&Command::Switch { app: app.into() }).unwrap();
        let Value::Object(config) = config else {
            panic!()
        };
        let (mut s, _) = s
            .apply(&Command::Config {
                app: app.into(),
                config,
            })
            .unwrap();
        s.settings.brightness = 100;
        s
    }

    /// tom-thumb's digits and colon as its BDF source defines them (rows of
    /// 3 bits, left bit first), independent of the font crate.
    const TOM_THUMB_DIGITS: [[u8; 5]; 10] = [
        [0b011, 0b101, 0b101, 0b101, 0b110],
        [0b010, 0b110, 0b010, 0b010, 0b010],
        [0b110, 0b001, 0b010, 0b100, 0b111],
        [0b110, 0b001, 0b010, 0b001, 0b110],
        [0b101, 0b101, 0b111, 0b001, 0b001],
        [0b111, 0b100, 0b110, 0b001, 0b110],
        [0b011, 0b100, 0b111, 0b101, 0b111],
        [0b111, 0b001, 0b010, 0b100, 0b100],
        [0b111, 0b101, 0b111, 0b101, 0b111],
        [0b111, 0b101, 0b111, 0b001, 0b110],
    ];

    /// Reads tom-thumb text back from the lit pixels: glyphs are the runs of
    /// lit columns, each matched against [`TOM_THUMB_DIGITS`].
    fn read_tom_thumb(f: &Frame) -> String {
        let lit = |x: usize, y: usize| f.get(x, y) != [0, 0, 0];
        let rows: Vec<usize> = (0..HEIGHT)
            .filter(|&y| (0..WIDTH).any(|x| lit(x, y)))
            .collect();
        let (top, bottom) = (rows[0], *rows.last().unwrap());
        assert_eq!(bottom - top + 1, 5, "tom-thumb digits are 5 rows tall");
        let mut out = String::new();
        let mut x = 0;
        while x < WIDTH {
            if !(top..=bottom).any(|y| lit(x, y)) {
                x += 1;
                continue;
            }
            let start = x;
            while x < WIDTH && (top..=bottom).any(|y| lit(x, y)) {
                x += 1;
            }
            let glyph: Vec<u8> = (top..=bottom)
                .map(|y| (start..x).fold(0, |acc, gx| acc << 1 | u8::from(lit(gx, y))))
                .collect();
            let w = x - start;
            let ch = if w == 1 && glyph == [0, 1, 0, 1, 0] {
                ':'
            } else {
                let d = TOM_THUMB_DIGITS
                    .iter()
                    .position(|d| {
                        // A narrow glyph ('1') has its blank columns trimmed.
                        let shift = 3 - w.min(3);
                        let trimmed: Vec<u8> = d.iter().map(|r| r >> shift).collect();
                        d.iter().all(|r| r & ((1 << shift) - 1) == 0) && trimmed == glyph
                    })
                    .unwrap_or_else(|| panic!("unknown glyph {glyph:?} at x={start}"));
                char::from(b'0' + d as u8)
            };
            out.push(ch);
        }
        out
    }

    #[test]
    fn frame_times_fall_on_slots() {
        assert_eq!(frame_time(1_000, 20), 1_000);
        assert_eq!(frame_time(1_049, 20), 1_000);
        assert_eq!(frame_time(1_050, 20), 1_050);
        assert_eq!(frame_time(1_999, 30), 1_966);
        assert_eq!(frame_time(T, 1), T - 250);
    }

    #[test]
    fn clock_shows_the_utc_minute_in_tom_thumb() {
        let s = state("clock", json!({}));
        let f = render(&s, T);
        assert_eq!(read_tom_thumb(&f), "13:45");
        // Centered, white, one color.
        let lit: Vec<_> = f.pixels().iter().filter(|p| **p != [0, 0, 0]).collect();
        assert!(lit.iter().all(|p| **p == [255, 255, 255]));
        let xs: Vec<usize> = (0..WIDTH)
            .filter(|&x| (0..HEIGHT).any(|y| f.get(x, y) != [0; 3]))
            .collect();
        let (l, r) = (xs[0], WIDTH - 1 - xs.last().unwrap());
        assert!(l.abs_diff(r) <= 1, "left margin {l}, right margin {r}");
        // The same minute all minute long, the next one after it.
        assert_eq!(render(&s, T - 30_250), f);
        assert_eq!(read_tom_thumb(&render(&s, T + 29_750)), "13:46");
        assert_eq!(
            read_tom_thumb(&render(&s, T + 10 * 3_600_000 + 15 * 60_000)),
            "00:00"
        );
    }

    #[test]
    fn tom_thumb_digits_match_the_bdf_source() {
        // Every digit through the crate equals the BDF bitmap.
        for h in 0..24 {
            for m in [h, 59 - h] {
                let t = (h * 3_600 + m * 60) * 1000;
                assert_eq!(
                    read_tom_thumb(&render(&state("clock", json!({})), t)),
                    format!("{h:02}:{m:02}")
                );
            }
        }
    }

    #[test]
    fn frames_stay_the_same_until_stable_until() {
        for zone in ["UTC", "Asia/Kolkata", "Asia/Kathmandu"] {
            let s = state("clock", json!({"timezone": zone}));
            let until = stable_until(&s, T);
            assert_eq!(until % 60_000, 0, "{zone}: on a minute");
            assert!(until > T && until <= T + 60_000);
            assert_eq!(render(&s, until - 1), render(&s, T), "{zone}");
            assert_ne!(render(&s, until), render(&s, T), "{zone}: the next minute");
        }
        for (app, config) in [("scroll_text", json!({})), ("stars", json!({}))] {
            assert_eq!(stable_until(&state(app, config), T), T, "{app} moves");
        }
        let empty = state("scroll_text", json!({"text": ""}));
        assert_eq!(stable_until(&empty, T), i64::MAX);
        let mut dark = state("stars", json!({}));
        dark.settings.brightness = 0;
        assert_eq!(stable_until(&dark, T), i64::MAX);
        assert_eq!(
            stable_until(&DeviceState::initial(&["weather".into()]), T),
            i64::MAX
        );
    }

    #[test]
    fn clock_time_zone_and_12_hours() {
        let berlin = state("clock", json!({"timezone": "Europe/Berlin"}));
        assert_eq!(
            read_tom_thumb(&render(&berlin, T)),
            "14:45",
            "CET in December"
        );
        let tokyo = state("clock", json!({"timezone": "Asia/Tokyo"}));
        assert_eq!(read_tom_thumb(&render(&tokyo, T)), "22:45");
        // 12 h: "1:45" and "PM" below it (the letters are not digits, so read
        // the top line only).
        let f = render(&state("clock", json!({"format_24h": false})), T);
        let rows: Vec<usize> = (0..HEIGHT)
            .filter(|&y| (0..WIDTH).any(|x| f.get(x, y) != [0; 3]))
            .collect();
        assert_eq!(rows.len(), 10, "two lines of 5 rows: {rows:?}");
        let mut top = f.clone();
        for y in rows[5]..HEIGHT {
            for x in 0..WIDTH {
                top.pixels_mut()[y * WIDTH + x] = [0; 3];
            }
        }
        assert_eq!(read_tom_thumb(&top), "1:45");
    }

    #[test]
    fn clock_fonts_fit_the_board_unclipped() {
        for font in FONT_NAMES
            .iter()
            .chain(["small", "default", "large", "bold"].iter())
        {
            for h24 in [true, false] {
                let s = state(
                    "clock",
                    json!({"font": font, "format_24h": h24, "color": [0, 0, 255]}),
                );
                let f = render(&s, T);
                let text = if h24 { "13:45" } else { "1:45" };
                let b = bounds(Font::from_name(font).unwrap(), text).unwrap();
                // Every pixel of the text's glyphs is on the board.
                let drawn = f.pixels().iter().filter(|p| **p == [0, 0, 255]).count();
                assert!(drawn > 0, "{font}");
                assert!(b.size.width as usize <= WIDTH && b.size.height as usize <= HEIGHT);
                // Nothing touches the edge: the time is whole.
                for x in 0..WIDTH {
                    assert_eq!(f.get(x, 0), [0; 3], "{font} top row");
                    assert_eq!(f.get(x, HEIGHT - 1), [0; 3], "{font} bottom row");
                }
                for y in 0..HEIGHT {
                    assert_eq!(f.get(0, y), [0; 3], "{font} left column");
                    assert_eq!(f.get(WIDTH - 1, y), [0; 3], "{font} right column");
                }
            }
        }
        // The larger font is larger.
        let small = render(&state("clock", json!({"font": "tom-thumb"})), T).lit();
        let large = render(&state("clock", json!({"font": "10x20"})), T).lit();
        assert!(large > 3 * small, "{large} vs {small}");
    }

    #[test]
    fn scroll_text_moves_left_at_its_speed() {
        let s = state(
            "scroll_text",
            json!({"text": "HELLO", "speed": 20, "color": [0, 255, 0]}),
        );
        let leftmost = |f: &Frame| (0..WIDTH).find(|&x| (0..HEIGHT).any(|y| f.get(x, y) != [0; 3]));
        // At the start of a cycle the text is just off the right edge.
        let cycle_ms = (WIDTH as i64 + 30) * 1000 / 20; // "HELLO" in 6x10 is 30 px
        let start = 1_000 * cycle_ms;
        assert_eq!(leftmost(&render(&s, start)), None);
        let a = render(&s, start + 1_000);
        let b = render(&s, start + 1_500);
        assert_eq!(leftmost(&a), Some(WIDTH - 20), "20 px in after 1 s");
        assert_eq!(leftmost(&b), Some(WIDTH - 30), "10 px more after 0.5 s");
        // The same pixels, shifted: b is a moved 10 to the left.
        for y in 0..HEIGHT {
            for x in 0..WIDTH - 10 {
                assert_eq!(b.get(x, y), a.get(x + 10, y), "({x},{y})");
            }
        }
        assert!(a.pixels().iter().all(|p| *p == [0; 3] || *p == [0, 255, 0]));
        // Control characters do not break the line; empty text is dark.
        let s2 = state("scroll_text", json!({"text": "HE\nLLO"}));
        assert!(render(&s2, start + 2_000).lit() > 0);
        let empty = state("scroll_text", json!({"text": ""}));
        assert_eq!(render(&empty, T).lit(), 0);
    }

    #[test]
    fn stars_twinkle_with_their_density() {
        let s = state("stars", json!({"density": 50}));
        let a = render(&s, T);
        let b = render(&s, T + 200);
        assert_ne!(a, b, "twinkling");
        assert_eq!(render(&s, T), a, "pure: same time, same sky");
        // Same places, different levels: about 15 % of the pixels.
        let places = |f: &Frame| f.pixels().iter().map(|p| *p != [0; 3]).collect::<Vec<_>>();
        assert_eq!(places(&a), places(&b));
        let n = a.lit();
        assert!((200..400).contains(&n), "{n} stars at density 50");
        assert_eq!(render(&state("stars", json!({"density": 0})), T).lit(), 0);
        let dense = render(&state("stars", json!({"density": 100})), T).lit();
        assert!(dense > n, "{dense}");
        // At most 8 levels of one color: a small palette for the stream.
        let mut colors: Vec<[u8; 3]> = a.pixels().to_vec();
        colors.sort();
        colors.dedup();
        assert!(colors.len() <= 9, "{colors:?}");
    }

    #[test]
    fn brightness_scales_every_pixel() {
        let mut s = state("clock", json!({"color": [200, 100, 40]}));
        let full = render(&s, T);
        s.settings.brightness = 50;
        let half = render(&s, T);
        for (f, h) in full.pixels().iter().zip(half.pixels()) {
            assert_eq!(*h, f.map(|v| v / 2));
        }
        s.settings.brightness = 0;
        assert_eq!(render(&s, T).lit(), 0);
    }

    #[test]
    fn other_apps_show_their_name() {
        let s = DeviceState::initial(&["weather".into()]);
        assert!(render(&s, T).lit() > 0);
    }

    #[test]
    fn fonts_and_zones_by_name() {
        assert!(is_font("tom-thumb") && is_font("10x20") && is_font("default"));
        assert!(!is_font("comic-sans"));
        assert!(is_time_zone("UTC") && is_time_zone("America/New_York"));
        assert!(!is_time_zone("Mars/Olympus") && !is_time_zone(""));
    }
}
