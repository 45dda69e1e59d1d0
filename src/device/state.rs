//! The LED board's state, the commands that change it, and their validation.
//!
//! Everything here is pure: the receiving node validates a command against
//! its cached state with [`DeviceState::apply`], and the leader applies the
//! same function to the authoritative state, so both agree on what is valid.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::render;

/// The four events published on topic `device`, in the order a new client
/// receives them.
pub const EVENTS: [&str; 4] = ["apps_list", "current_app", "settings", "carousel_config"];

/// Also on topic `device`: every app's config, published when the config of
/// an app that is not on screen changes (so every node's copy stays whole).
pub const APP_CONFIGS: &str = "app_configs";

/// The topic that carries device state changes.
pub const TOPIC: &str = "device";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub brightness: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarouselEntry {
    pub app: String,
    /// Seconds, > 0.
    pub duration: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carousel {
    pub enabled: bool,
    pub apps: Vec<CarouselEntry>,
    pub current_index: usize,
}

/// The whole state. `configs` keeps each app's config, so switching back to
/// an app restores how it was set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub apps: Vec<String>,
    pub current_app: String,
    pub configs: BTreeMap<String, Value>,
    pub settings: Settings,
    pub carousel: Carousel,
    /// Fencing epoch of the leader that wrote this state.
    #[serde(default)]
    pub epoch: u64,
}

/// A validated command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Switch {
        app: String,
    },
    Config {
        app: String,
        config: Map<String, Value>,
    },
    Carousel {
        enabled: Option<bool>,
        apps: Option<Vec<CarouselEntry>>,
    },
    Settings {
        brightness: u8,
    },
    /// Carousel step, issued by the leader itself.
    Rotate,
}

impl Command {
    /// The label for metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Switch { .. } => "switch",
            Command::Config { .. } => "config",
            Command::Carousel { .. } => "carousel",
            Command::Settings { .. } => "settings",
            Command::Rotate => "rotate",
        }
    }
}

/// A command that cannot be applied; the text names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

impl DeviceState {
    /// The state of a new board with `apps`.
    pub fn initial(apps: &[String]) -> DeviceState {
        let configs = apps
            .iter()
            .map(|a| (a.clone(), default_config(a)))
            .collect();
        DeviceState {
            apps: apps.to_vec(),
            current_app: apps[0].clone(),
            configs,
            settings: Settings { brightness: 75 },
            carousel: Carousel {
                enabled: false,
                apps: Vec::new(),
                current_index: 0,
            },
            epoch: 0,
        }
    }

    pub fn config_of(&self, app: &str) -> Value {
        self.configs
            .get(app)
            .cloned()
            .unwrap_or_else(|| default_config(app))
    }

    /// Applies `cmd`, returning the new state and which events changed.
    pub fn apply(&self, cmd: &Command) -> Result<(DeviceState, Vec<&'static str>), Invalid> {
        let mut next = self.clone();
        let mut changed = Vec::new();
        match cmd {
            Command::Switch { app } => {
                self.check_app("app", app)?;
                next.current_app = app.clone();
                changed.extend(["apps_list", "current_app"]);
            }
            Command::Config { app, config } => {
                self.check_app("app", app)?;
                let mut merged = match self.config_of(app) {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                for (k, v) in config {
                    merged.insert(k.clone(), v.clone());
                }
                validate_config(app, &merged)?;
                next.configs.insert(app.clone(), Value::Object(merged));
                if *app == self.current_app {
                    changed.push("current_app");
                } else {
                    // Not on screen: tell the other nodes' caches anyway.
                    changed.push("app_configs");
                }
            }
            Command::Carousel { enabled, apps } => {
                if let Some(apps) = apps {
                    for (i, e) in apps.iter().enumerate() {
                        self.check_app(&format!("apps[{i}].app"), &e.app)?;
                        if e.duration == 0 {
                            return invalid(format!(
                                "apps[{i}].duration must be a whole number of seconds greater than 0"
                            ));
                        }
                    }
                    next.carousel.apps = apps.clone();
                    next.carousel.current_index = 0;
                }
                if let Some(enabled) = enabled {
                    next.carousel.enabled = *enabled;
                }
                if next.carousel.enabled && next.carousel.apps.is_empty() {
                    return invalid("apps must list at least one app when the carousel is enabled");
                }
                if next.carousel.enabled && next.carousel != self.carousel {
                    // Start the rotation at its first app.
                    let first = next.carousel.apps[next.carousel.current_index].app.clone();
                    if first != next.current_app {
                        next.current_app = first;
                        changed.extend(["apps_list", "current_app"]);
                    }
                }
                changed.push("carousel_config");
            }
            Command::Settings { brightness } => {
                if *brightness > 100 {
                    return invalid("brightness must be a whole number from 0 to 100");
                }
                next.settings.brightness = *brightness;
                changed.push("settings");
            }
            Command::Rotate => {
                let c = &mut next.carousel;
                if !c.enabled || c.apps.is_empty() {
                    return Ok((next, changed));
                }
                c.current_index = (c.current_index + 1) % c.apps.len();
                next.current_app = c.apps[c.current_index].app.clone();
                changed.extend(["current_app", "carousel_config"]);
            }
        }
        Ok((next, changed))
    }

    fn check_app(&self, field: &str, app: &str) -> Result<(), Invalid> {
        if self.apps.iter().any(|a| a == app) {
            Ok(())
        } else {
            invalid(format!(
                "{field}: unknown app \"{}\"; available apps are {}",
                app.chars().take(64).collect::<String>(),
                self.apps.join(", ")
            ))
        }
    }

    /// The payload of one of the [`EVENTS`], as the dashboards expect it.
    pub fn event(&self, name: &str) -> Value {
        match name {
            "apps_list" => json!({"apps": self.apps, "current": self.current_app}),
            "current_app" => {
                json!({"app": self.current_app, "config": self.config_of(&self.current_app)})
            }
            "settings" => json!({"brightness": self.settings.brightness}),
            "app_configs" => json!({"configs": self.configs}),
            "carousel_config" => json!({
                "enabled": self.carousel.enabled,
                "apps": self.carousel.apps,
                "current_index": self.carousel.current_index,
            }),
            _ => Value::Null,
        }
    }

    /// The whole state as `GET /api/state` and a native `request` of
    /// `device` return it.
    pub fn to_json(&self) -> Value {
        json!({
            "apps": self.apps,
            "current_app": self.current_app,
            "config": self.config_of(&self.current_app),
            "configs": self.configs,
            "settings": self.settings,
            "carousel": self.event("carousel_config"),
            "epoch": self.epoch,
        })
    }

    /// Folds one published device event into this (cached) state.
    pub fn absorb(&mut self, event: &str, data: &Value) {
        match event {
            "apps_list" => {
                if let Some(apps) = data["apps"].as_array() {
                    let apps: Vec<String> = apps
                        .iter()
                        .filter_map(|a| a.as_str().map(String::from))
                        .collect();
                    if !apps.is_empty() {
                        self.apps = apps;
                    }
                }
                if let Some(cur) = data["current"].as_str() {
                    self.current_app = cur.to_string();
                }
            }
            "current_app" => {
                if let Some(app) = data["app"].as_str() {
                    self.current_app = app.to_string();
                    if data["config"].is_object() {
                        self.configs.insert(app.to_string(), data["config"].clone());
                    }
                }
            }
            "app_configs" => {
                if let Some(configs) = data["configs"].as_object() {
                    for (app, config) in configs {
                        if config.is_object() {
                            self.configs.insert(app.clone(), config.clone());
                        }
                    }
                }
            }
            "settings" => {
                if let Some(b) = data["brightness"].as_u64().filter(|b| *b <= 100) {
                    self.settings.brightness = b as u8;
                }
            }
            "carousel_config" => {
                if let Ok(c) = serde_json::from_value::<Carousel>(data.clone()) {
                    self.carousel = c;
                }
            }
            _ => {}
        }
    }
}

// === request bodies → commands ===

/// The most entries a carousel's `apps` may have.
pub const MAX_CAROUSEL_APPS: usize = 256;

/// Parses and checks a REST body; every message names the field and the rule.
pub fn parse_command(kind: &str, body: &Value, state: &DeviceState) -> Result<Command, Invalid> {
    let Value::Object(obj) = body else {
        return invalid("body must be a JSON object");
    };
    let cmd = match kind {
        "switch" => Command::Switch {
            app: string_field(obj, "app")?.ok_or_else(|| Invalid("app is required".into()))?,
        },
        "config" => {
            let app = string_field(obj, "app")?.unwrap_or_else(|| state.current_app.clone());
            let config = match obj.get("config") {
                Some(Value::Object(m)) => m.clone(),
                Some(_) => return invalid("config must be a JSON object"),
                None => return invalid("config is required"),
            };
            Command::Config { app, config }
        }
        "carousel" => {
            let enabled = match obj.get("enabled") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return invalid("enabled must be true or false"),
            };
            let apps = match obj.get("apps") {
                None | Some(Value::Null) => None,
                Some(Value::Array(items)) => {
                    // Each step saves and broadcasts the whole list: a
                    // carousel is a rotation of a few apps, not a store.
                    if items.len() > MAX_CAROUSEL_APPS {
                        return invalid(format!(
                            "apps must have at most {MAX_CAROUSEL_APPS} entries"
                        ));
                    }
                    let mut apps = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let app = item["app"].as_str().ok_or_else(|| {
                            Invalid(format!("apps[{i}].app is required and must be a string"))
                        })?;
                        let duration = item["duration"]
                            .as_u64()
                            .filter(|d| *d > 0 && *d <= 86_400)
                            .ok_or_else(|| {
                                Invalid(format!(
                                    "apps[{i}].duration must be a whole number of seconds from 1 to 86400"
                                ))
                            })?;
                        apps.push(CarouselEntry {
                            app: app.to_string(),
                            duration: duration as u32,
                        });
                    }
                    Some(apps)
                }
                Some(_) => return invalid("apps must be an array of {\"app\",\"duration\"}"),
            };
            if enabled.is_none() && apps.is_none() {
                return invalid("give enabled, apps or both");
            }
            Command::Carousel { enabled, apps }
        }
        "settings" => {
            let brightness = match obj.get("brightness") {
                None => return invalid("brightness is required"),
                Some(Value::Number(n)) => n.as_u64().filter(|b| *b <= 100).ok_or_else(|| {
                    Invalid("brightness must be a whole number from 0 to 100".into())
                })?,
                Some(_) => return invalid("brightness must be a number from 0 to 100"),
            };
            Command::Settings {
                brightness: brightness as u8,
            }
        }
        other => return invalid(format!("unknown command {other}")),
    };
    // Validate against the current state so the leader only sees good commands.
    state.apply(&cmd)?;
    Ok(cmd)
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, Invalid> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => invalid(format!("{name} must be a string")),
    }
}

// === app config schemas ===

/// The config a known app starts with; apps without a schema start empty.
pub fn default_config(app: &str) -> Value {
    match app {
        "clock" => json!({
            "font": "tom-thumb",
            "color": [255, 255, 255],
            "format_24h": true,
            "timezone": "UTC",
        }),
        "scroll_text" => json!({
            "text": "Hello from Switchboard",
            "speed": 20,
            "color": [0, 255, 0],
            "font": "6x10",
        }),
        "stars" => json!({"density": 50, "color": [255, 255, 0]}),
        _ => json!({}),
    }
}

/// Checks a whole (merged) config against the app's schema. Documented in
/// `docs/protocol.md`.
fn validate_config(app: &str, config: &Map<String, Value>) -> Result<(), Invalid> {
    let fields: &[(&str, Rule)] = match app {
        "clock" => &[
            ("font", Rule::Font),
            ("color", Rule::Color),
            ("format_24h", Rule::Bool),
            ("timezone", Rule::TimeZone),
        ],
        "scroll_text" => &[
            ("text", Rule::Text(256)),
            ("speed", Rule::Int(1, 100)),
            ("color", Rule::Color),
            ("font", Rule::Font),
        ],
        "stars" => &[("density", Rule::Int(0, 100)), ("color", Rule::Color)],
        _ => {
            // No schema: any JSON object of modest size and depth. The
            // depth bound is publication data's: the config travels inside
            // the state (and the leader's replies), a few levels down, and
            // serde_json gives up at 128 levels, so a deeper config would
            // make the saved state unreadable.
            let text = serde_json::to_string(config).unwrap_or_default();
            if text.len() > 16 * 1024 {
                return invalid("config must be at most 16 KiB of JSON");
            }
            if crate::protocol::json_depth_exceeds(&text, crate::protocol::MAX_DATA_DEPTH) {
                return invalid(
                    "config is nested too deeply: at most 64 levels of arrays and objects are allowed",
                );
            }
            return Ok(());
        }
    };
    for key in config.keys() {
        if !fields.iter().any(|(f, _)| f == key) {
            let allowed: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
            return invalid(format!(
                "config.{key} is not a setting of {app}; allowed: {}",
                allowed.join(", ")
            ));
        }
    }
    for (field, rule) in fields {
        if let Some(v) = config.get(*field) {
            rule.check(&format!("config.{field}"), v)?;
        }
    }
    Ok(())
}

/// `; "x" is unknown` for a string value (cut to 64 characters), so the
/// sender sees which value was refused.
fn unknown(v: &Value) -> String {
    v.as_str().map_or(String::new(), |s| {
        format!(
            "; \"{}\" is unknown",
            s.chars().take(64).collect::<String>()
        )
    })
}

enum Rule {
    Color,
    Bool,
    Int(i64, i64),
    Text(usize),
    /// One of the fonts the renderer has (`render::FONT_NAMES`).
    Font,
    /// A name of the compiled-in tz database.
    TimeZone,
}

impl Rule {
    fn check(&self, field: &str, v: &Value) -> Result<(), Invalid> {
        match self {
            Rule::Color => {
                let ok = v.as_array().is_some_and(|a| {
                    a.len() == 3 && a.iter().all(|c| c.as_u64().is_some_and(|c| c <= 255))
                });
                if !ok {
                    return invalid(format!("{field} must be [r, g, b] with each from 0 to 255"));
                }
            }
            Rule::Bool => {
                if !v.is_boolean() {
                    return invalid(format!("{field} must be true or false"));
                }
            }
            Rule::Int(lo, hi) => {
                if !v.as_i64().is_some_and(|n| (*lo..=*hi).contains(&n)) {
                    return invalid(format!("{field} must be a whole number from {lo} to {hi}"));
                }
            }
            Rule::Text(max) => match v.as_str() {
                Some(s) if s.chars().count() <= *max => {}
                _ => {
                    return invalid(format!(
                        "{field} must be a string of at most {max} characters"
                    ));
                }
            },
            Rule::Font => {
                if !v.as_str().is_some_and(render::is_font) {
                    return invalid(format!(
                        "{field} must be one of {}{}",
                        render::FONT_NAMES.join(", "),
                        unknown(v)
                    ));
                }
            }
            Rule::TimeZone => {
                if !v.as_str().is_some_and(render::is_time_zone) {
                    return invalid(format!(
                        "{field} must be a time zone name such as UTC, Europe/Berlin or America/New_York{}",
                        unknown(v)
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> DeviceState {
        DeviceState::initial(&["clock".into(), "scroll_text".into(), "stars".into()])
    }

    #[test]
    fn switch_and_events() {
        let s = state();
        let cmd = parse_command("switch", &json!({"app":"stars"}), &s).unwrap();
        let (next, changed) = s.apply(&cmd).unwrap();
        assert_eq!(next.current_app, "stars");
        assert!(changed.contains(&"current_app"));
        assert_eq!(next.event("current_app")["app"], "stars");
        assert_eq!(
            next.event("apps_list"),
            json!({"apps":["clock","scroll_text","stars"],"current":"stars"})
        );
    }

    #[test]
    fn validation_names_the_field_and_rule() {
        let s = state();
        let e = parse_command("settings", &json!({"brightness":150}), &s).unwrap_err();
        assert!(
            e.0.contains("brightness") && e.0.contains("0 to 100"),
            "{e}"
        );
        let e = parse_command("settings", &json!({"brightness":"high"}), &s).unwrap_err();
        assert!(e.0.contains("brightness"), "{e}");
        let e = parse_command("switch", &json!({"app":"tetris"}), &s).unwrap_err();
        assert!(e.0.contains("unknown app") && e.0.contains("tetris"), "{e}");
        let e = parse_command(
            "config",
            &json!({"app":"clock","config":{"color":[1,2]}}),
            &s,
        )
        .unwrap_err();
        assert!(e.0.contains("config.color"), "{e}");
        let e = parse_command("config", &json!({"config":{"speed":5}}), &s).unwrap_err();
        assert!(
            e.0.contains("config.speed is not a setting of clock"),
            "{e}"
        );
        let e = parse_command(
            "carousel",
            &json!({"enabled":true,"apps":[{"app":"clock","duration":0}]}),
            &s,
        )
        .unwrap_err();
        assert!(e.0.contains("apps[0].duration"), "{e}");
        let e = parse_command("carousel", &json!({"enabled":true}), &s).unwrap_err();
        assert!(e.0.contains("at least one app"), "{e}");
        let e = parse_command("config", &json!({"config":{"font":"comic-sans"}}), &s).unwrap_err();
        assert_eq!(
            e.0,
            "config.font must be one of tom-thumb, 6x10, 10x20, 9x15B; \"comic-sans\" is unknown"
        );
        let e = parse_command("config", &json!({"config":{"font":7}}), &s).unwrap_err();
        assert_eq!(
            e.0,
            "config.font must be one of tom-thumb, 6x10, 10x20, 9x15B"
        );
        let e = parse_command(
            "config",
            &json!({"app":"scroll_text","config":{"font":"huge"}}),
            &s,
        )
        .unwrap_err();
        assert!(e.0.starts_with("config.font must be one of"), "{e}");
        let e = parse_command("config", &json!({"config":{"timezone":"Mars/Olympus"}}), &s)
            .unwrap_err();
        assert!(
            e.0.starts_with("config.timezone must be a time zone name")
                && e.0.contains("\"Mars/Olympus\" is unknown"),
            "{e}"
        );
        // The names of configs written before the real fonts still pass.
        for font in ["tom-thumb", "10x20", "default", "small", "large", "bold"] {
            parse_command("config", &json!({"config":{"font":font}}), &s).unwrap();
        }
        parse_command(
            "config",
            &json!({"config":{"timezone":"Europe/Berlin","format_24h":false}}),
            &s,
        )
        .unwrap();
    }

    #[test]
    fn a_config_without_schema_and_a_carousel_are_bounded() {
        let s = DeviceState::initial(&["clock".into(), "weather".into()]);
        let nested = |depth: usize| -> Value {
            serde_json::from_str(&format!("{}1{}", "[".repeat(depth), "]".repeat(depth))).unwrap()
        };
        // The config object is level 1: 63 more fit, 64 do not.
        let ok = json!({"app":"weather","config":{"x":nested(63)}});
        let cmd = parse_command("config", &ok, &s).unwrap();
        let (after, _) = s.apply(&cmd).unwrap();
        // The state that carries it, saved and parsed again, is still JSON
        // serde_json reads.
        let saved = serde_json::to_string(&after).unwrap();
        assert!(serde_json::from_str::<DeviceState>(&saved).is_ok());
        let deep = json!({"app":"weather","config":{"x":nested(64)}});
        let e = parse_command("config", &deep, &s).unwrap_err();
        assert!(e.0.starts_with("config is nested too deeply"), "{e}");

        let entry = json!({"app":"clock","duration":5});
        let most = json!({"apps": vec![entry.clone(); MAX_CAROUSEL_APPS]});
        parse_command("carousel", &most, &s).unwrap();
        let many = json!({"apps": vec![entry; MAX_CAROUSEL_APPS + 1]});
        let e = parse_command("carousel", &many, &s).unwrap_err();
        assert_eq!(e.0, "apps must have at most 256 entries");
    }

    #[test]
    fn config_merges_and_is_kept_per_app() {
        let s = state();
        let cmd = parse_command(
            "config",
            &json!({"app":"scroll_text","config":{"text":"hi"}}),
            &s,
        )
        .unwrap();
        let (s, changed) = s.apply(&cmd).unwrap();
        assert_eq!(
            changed,
            vec!["app_configs"],
            "not on screen: no current_app event"
        );
        let mut cache = state();
        cache.absorb("app_configs", &s.event("app_configs"));
        assert_eq!(cache.configs["scroll_text"]["text"], "hi");
        assert_eq!(s.configs["scroll_text"]["text"], "hi");
        assert_eq!(s.configs["scroll_text"]["speed"], 20);
        let (s, _) = s
            .apply(&Command::Switch {
                app: "scroll_text".into(),
            })
            .unwrap();
        assert_eq!(s.event("current_app")["config"]["text"], "hi");
    }

    #[test]
    fn carousel_rotates_and_applying_twice_is_idempotent() {
        let s = state();
        let body = json!({"enabled":true,"apps":[{"app":"stars","duration":1},{"app":"clock","duration":1}]});
        let cmd = parse_command("carousel", &body, &s).unwrap();
        let (s1, _) = s.apply(&cmd).unwrap();
        let (s2, _) = s1.apply(&cmd).unwrap();
        assert_eq!(s1, s2);
        assert_eq!(s1.current_app, "stars");
        let (r, changed) = s1.apply(&Command::Rotate).unwrap();
        assert_eq!(r.current_app, "clock");
        assert_eq!(r.carousel.current_index, 1);
        assert_eq!(changed, vec!["current_app", "carousel_config"]);
        let (r, _) = r.apply(&Command::Rotate).unwrap();
        assert_eq!(r.current_app, "stars");
    }

    #[test]
    fn events_rebuild_the_state() {
        let s = state();
        let (s, _) = s.apply(&Command::Settings { brightness: 10 }).unwrap();
        let (s, _) = s
            .apply(&Command::Switch {
                app: "stars".into(),
            })
            .unwrap();
        let mut cache = state();
        for e in EVENTS {
            cache.absorb(e, &s.event(e));
        }
        assert_eq!(cache.current_app, "stars");
        assert_eq!(cache.settings.brightness, 10);
        assert_eq!(cache.event("current_app"), s.event("current_app"));
    }
}
