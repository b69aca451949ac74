//! Where configuration comes from besides the file: environment variables,
//! read through a trait so tests can pass a map instead of mutating the
//! process environment.

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
