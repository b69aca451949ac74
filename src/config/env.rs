//! Where configuration comes from besides the file: environment variables,
//! read through a trait so tests can pass a map instead of mutating the
//! process environment. They override settings of the file
//! ([`Overrides`]), which then answer for the errors those settings cause,
//! and carry the secrets ([`read_secret`]).

use super::ConfigError;
use crate::secret::Secret;
use std::collections::HashMap;

/// A source of environment variables.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
    /// Every variable, for the `KEYROUTER_<SECTION>__<KEY>` overrides.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }

    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Reads secret `name` from the variable itself or from the file named by
/// `<name>_FILE` (Kubernetes secrets). Setting both is an error, so it is
/// never unclear which one is in force. Leading and trailing ASCII
/// whitespace is not part of the secret, and a value of nothing else
/// counts as unset. Errors name the variable, never its value.
pub fn read_secret(env: &dyn Env, name: &str) -> Result<Option<Secret>, String> {
    let file_var = format!("{name}_FILE");
    let direct = env.get(name).and_then(trimmed);
    let file = env.get(&file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => Err(format!("set only one of {name} and {file_var}")),
        (Some(secret), None) => Ok(Some(secret)),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map(trimmed)
            .map_err(|e| format!("{file_var}: cannot read the file it names ({})", e.kind())),
        (None, None) => Ok(None),
    }
}

/// The secret in `raw` without the whitespace around it: the newline an
/// editor or `echo` leaves at the end of a secret file, spaces or a tab
/// copied along. No client could present it with that whitespace (HTTP
/// drops it from header values), so every management call would get 401.
/// `None` when nothing else is left. The untrimmed copy is zeroed.
fn trimmed(raw: String) -> Option<Secret> {
    let raw = zeroize::Zeroizing::new(raw);
    let value = raw.trim_ascii();
    (!value.is_empty()).then(|| Secret::new(value.to_owned()))
}

/// The `KEYROUTER_<SECTION>__<KEY>` overrides in force, as pairs of the
/// setting set (`server.listen`, `providers[0].base_url`) and the variable
/// that set it.
///
/// An error about a setting whose value came from the environment names
/// the variable ([`Overrides::blame`]): the file shows another value or
/// none, and the operator must learn where to look. Only the name, never
/// the value, which may be a secret typed into the wrong variable.
pub struct Overrides(Vec<(String, String)>);

impl Overrides {
    /// Applies the overrides to the file's `table` (any depth, array
    /// indices as numbers: `KEYROUTER_PROVIDERS__0__BASE_URL`). A value is
    /// read as a TOML value when it parses as one (numbers, booleans,
    /// arrays), else as a string.
    pub fn apply(table: &mut toml::Table, env: &dyn Env) -> Result<Overrides, ConfigError> {
        let mut vars: Vec<(Vec<Segment>, String, String)> = env
            .vars()
            .into_iter()
            .filter(|(k, _)| k.starts_with("KEYROUTER_") && k.contains("__"))
            .map(|(name, value)| {
                let path = name["KEYROUTER_".len()..]
                    .split("__")
                    .map(Segment::of)
                    .collect();
                (path, name, value)
            })
            .collect();
        // In the order of their paths, list indices as numbers: entry 9 of a
        // list is added before entry 10.
        vars.sort();
        let mut applied = Vec::with_capacity(vars.len());
        for (path, name, value) in vars {
            if path.contains(&Segment::Name(String::new())) {
                return Err(ConfigError::Other(format!(
                    "{name}: malformed override name"
                )));
            }
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            set_path(table, &path, parsed).map_err(|e| {
                ConfigError::Other(match e {
                    PathError::Shape => {
                        format!("{name}: does not match the shape of the configuration")
                    }
                    PathError::PastTheEnd { index, len } => format!(
                        "{name}: there is no entry {index} to set in a list of {len}; \
                         an override can only add the next one, entry {len}, and that \
                         with all of its required settings"
                    ),
                })
            })?;
            applied.push((setting_path(&path), name));
        }
        Ok(Overrides(applied))
    }

    /// `error`, led by the name of the variable that set one of the
    /// settings it is about, a value within one (`KEYROUTER_FOO__BAR` for
    /// the unknown setting `foo`) or a value holding one
    /// (`KEYROUTER_PROVIDERS__0` for `providers[0].id`); unchanged when
    /// the file set them.
    pub fn blame(&self, error: ConfigError) -> ConfigError {
        let ConfigError::Setting { settings, .. } = &error else {
            return error;
        };
        let culprit = self
            .0
            .iter()
            .find(|(set, _)| settings.iter().any(|s| holds(s, set) || holds(set, s)));
        match culprit {
            Some((_, var)) => ConfigError::Override {
                var: var.clone(),
                error: Box::new(error),
            },
            None => error,
        }
    }
}

/// A segment of an override's path: a list index (written without leading
/// zeros in errors, so `00` and `0` name the same entry everywhere) or a
/// setting's name, lowercase.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Index(usize),
    Name(String),
}

impl Segment {
    fn of(raw: &str) -> Segment {
        match raw.parse::<usize>() {
            Ok(index) if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) => {
                Segment::Index(index)
            }
            _ => Segment::Name(raw.to_ascii_lowercase()),
        }
    }

    /// The key of a table this segment names.
    fn key(&self) -> String {
        match self {
            Segment::Index(i) => i.to_string(),
            Segment::Name(n) => n.clone(),
        }
    }
}

/// A setting's path as errors spell it: `providers[0].base_url`.
fn setting_path(segments: &[Segment]) -> String {
    let mut path = String::new();
    for segment in segments {
        match segment {
            Segment::Index(i) => path.push_str(&format!("[{i}]")),
            Segment::Name(name) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(name);
            }
        }
    }
    path
}

/// Whether the setting at path `outer` is the one at `inner` or holds it
/// (`server` holds `server.listen`, `providers` holds `providers[0].id`).
fn holds(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// Why an override's path does not fit the configuration.
enum PathError {
    /// It runs into a value that is not a table or a list, or names a
    /// list entry by something other than a number.
    Shape,
    /// It names a list entry beyond the next one.
    PastTheEnd { index: usize, len: usize },
}

fn set_path(
    table: &mut toml::Table,
    path: &[Segment],
    value: toml::Value,
) -> Result<(), PathError> {
    let (first, rest) = path.split_first().ok_or(PathError::Shape)?;
    let Some(next_segment) = rest.first() else {
        table.insert(first.key(), value);
        return Ok(());
    };
    // What is missing is made as what the next segment asks for: a list
    // for an index (`PROVIDERS__0__ID` without `[[providers]]` in the
    // file), else a table.
    let next = table
        .entry(first.key())
        .or_insert_with(|| match next_segment {
            Segment::Index(_) => toml::Value::Array(Vec::new()),
            Segment::Name(_) => toml::Value::Table(toml::Table::new()),
        });
    set_value_path(next, rest, value)
}

fn set_value_path(
    node: &mut toml::Value,
    path: &[Segment],
    value: toml::Value,
) -> Result<(), PathError> {
    match (node, path.split_first()) {
        (toml::Value::Table(t), _) => set_path(t, path, value),
        (toml::Value::Array(items), Some((&Segment::Index(index), rest))) => {
            if index == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            let len = items.len();
            let item = items
                .get_mut(index)
                .ok_or(PathError::PastTheEnd { index, len })?;
            if rest.is_empty() {
                *item = value;
                Ok(())
            } else {
                set_value_path(item, rest, value)
            }
        }
        _ => Err(PathError::Shape),
    }
}
