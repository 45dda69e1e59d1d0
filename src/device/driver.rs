//! Hardware drivers. Only the leader holds one.
//!
//! To add a real panel: implement [`Driver`] (turn a [`DeviceState`] into
//! pixels or panel commands in `apply`, report trouble in `health`), add a
//! name to `DEVICE_DRIVER` in `config.rs` and a branch in [`make`]. `apply`
//! is called on the leader after each persisted change, one call at a time,
//! with the whole state, so a driver never has to merge deltas.

use serde::Serialize;

use super::state::DeviceState;

#[derive(Debug, thiserror::Error)]
#[error("driver: {0}")]
pub struct DriverError(pub String);

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriverHealth {
    pub driver: &'static str,
    pub ok: bool,
    pub applied: u64,
    /// Pixels lit in the last rendered frame (simulated driver only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lit_pixels: Option<usize>,
}

pub trait Driver: Send {
    fn apply(&mut self, state: &DeviceState) -> Result<(), DriverError>;
    fn health(&self) -> DriverHealth;
}

/// Builds the driver named by `DEVICE_DRIVER`.
pub fn make(name: &str) -> Box<dyn Driver> {
    match name {
        "log" => Box::new(LogDriver { applied: 0 }),
        _ => Box::new(SimulatedDriver::new()),
    }
}

/// Logs each applied state.
pub struct LogDriver {
    applied: u64,
}

impl Driver for LogDriver {
    fn apply(&mut self, state: &DeviceState) -> Result<(), DriverError> {
        self.applied += 1;
        tracing::info!(
            app = %state.current_app,
            brightness = state.settings.brightness,
            carousel = state.carousel.enabled,
            "device state applied"
        );
        Ok(())
    }

    fn health(&self) -> DriverHealth {
        DriverHealth {
            driver: "log",
            ok: true,
            applied: self.applied,
            lit_pixels: None,
        }
    }
}

pub const WIDTH: usize = 64;
pub const HEIGHT: usize = 32;

/// Renders the current app into an in-memory 64×32 RGB frame.
pub struct SimulatedDriver {
    frame: Vec<[u8; 3]>,
    applied: u64,
}

impl SimulatedDriver {
    pub fn new() -> Self {
        Self {
            frame: vec![[0; 3]; WIDTH * HEIGHT],
            applied: 0,
        }
    }

    pub fn frame(&self) -> &[[u8; 3]] {
        &self.frame
    }

    fn lit(&self) -> usize {
        self.frame.iter().filter(|p| **p != [0, 0, 0]).count()
    }
}

impl Default for SimulatedDriver {
    fn default() -> Self {
        Self::new()
    }
}

fn color(config: &serde_json::Value, brightness: u8) -> [u8; 3] {
    let mut c = [255u8; 3];
    if let Some(a) = config["color"].as_array() {
        for (i, v) in a.iter().take(3).enumerate() {
            c[i] = v.as_u64().unwrap_or(255).min(255) as u8;
        }
    }
    c.map(|v| (v as u32 * brightness as u32 / 100) as u8)
}

/// The 64×32 RGB frame the simulated driver shows for `state`, row by row.
/// Pure, so any node can render a preview of the board from its copy of the
/// state (`GET /api/frame`) without holding the driver.
pub fn render(state: &DeviceState) -> Vec<[u8; 3]> {
    let mut frame = vec![[0u8; 3]; WIDTH * HEIGHT];
    let config = state.config_of(&state.current_app);
    let c = color(&config, state.settings.brightness);
    match state.current_app.as_str() {
        "clock" => {
            // A frame around the edge.
            for x in 0..WIDTH {
                frame[x] = c;
                frame[(HEIGHT - 1) * WIDTH + x] = c;
            }
            for y in 0..HEIGHT {
                frame[y * WIDTH] = c;
                frame[y * WIDTH + WIDTH - 1] = c;
            }
        }
        "scroll_text" => {
            let len = config["text"].as_str().map_or(0, |t| t.chars().count());
            for x in 0..(len * 6).min(WIDTH) {
                for y in 12..20 {
                    frame[y * WIDTH + x] = c;
                }
            }
        }
        "stars" => {
            let density = config["density"].as_u64().unwrap_or(50) as usize;
            for (i, p) in frame.iter_mut().enumerate() {
                // Deterministic scatter: same config, same sky.
                if (i * 2_654_435_761) % 1000 < density * 3 {
                    *p = c;
                }
            }
        }
        _ => {
            for y in 0..HEIGHT {
                frame[y * WIDTH + WIDTH / 2] = c;
            }
        }
    }
    frame
}

impl Driver for SimulatedDriver {
    fn apply(&mut self, state: &DeviceState) -> Result<(), DriverError> {
        self.frame = render(state);
        self.applied += 1;
        Ok(())
    }

    fn health(&self) -> DriverHealth {
        DriverHealth {
            driver: "simulated",
            ok: true,
            applied: self.applied,
            lit_pixels: Some(self.lit()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::state::Command;

    #[test]
    fn simulated_driver_renders_apps_and_brightness() {
        let s = DeviceState::initial(&["clock".into(), "stars".into()]);
        let mut d = SimulatedDriver::new();
        d.apply(&s).unwrap();
        let clock_lit = d.health().lit_pixels.unwrap();
        assert_eq!(clock_lit, 2 * WIDTH + 2 * HEIGHT - 4);
        // white at brightness 75, in the corner of the clock's frame
        assert_eq!(d.frame()[0], [191, 191, 191]);
        let (dark, _) = s.apply(&Command::Settings { brightness: 0 }).unwrap();
        d.apply(&dark).unwrap();
        assert_eq!(d.health().lit_pixels, Some(0), "brightness 0 is dark");
        let (stars, _) = s
            .apply(&Command::Switch {
                app: "stars".into(),
            })
            .unwrap();
        d.apply(&stars).unwrap();
        assert_ne!(d.health().lit_pixels, Some(clock_lit));
        assert_eq!(d.health().applied, 3);
        assert_eq!(
            render(&stars),
            d.frame(),
            "the driver shows what render draws"
        );
    }
}
