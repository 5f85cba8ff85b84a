//! A small command-line parser: positional words and `--name value` / `--flag` options.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

/// Parsed arguments: the positional words in order and the options by name.
#[derive(Debug, Default)]
pub struct Args {
    positional: Vec<String>,
    options: BTreeMap<String, Option<String>>,
    used: std::cell::RefCell<Vec<String>>,
}

/// Options that never take a value.
const FLAGS: &[&str] = &[
    "chat",
    "ids",
    "no-cache",
    "help",
    "quiet",
    "json",
    "exact-values",
];

impl Args {
    /// Parses `args` (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args::default();
        let mut iter = args.into_iter();
        while let Some(arg) = iter.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let (name, inline) = match name.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (name.to_string(), None),
                };
                if name.is_empty() {
                    return Err("empty option name `--`".into());
                }
                let value = if inline.is_some() || FLAGS.contains(&name.as_str()) {
                    inline
                } else {
                    Some(
                        iter.next()
                            .ok_or_else(|| format!("option --{name} needs a value"))?,
                    )
                };
                parsed.options.insert(name, value);
            } else if arg == "-n" {
                let value = iter.next().ok_or("option -n needs a value")?;
                parsed.options.insert("n".into(), Some(value));
            } else {
                parsed.positional.push(arg);
            }
        }
        Ok(parsed)
    }

    /// Positional word `index`.
    pub fn positional(&self, index: usize) -> Option<&str> {
        self.positional.get(index).map(String::as_str)
    }

    /// True when `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.used.borrow_mut().push(name.into());
        self.options.contains_key(name)
    }

    /// The string value of `--name`, if given.
    pub fn string(&self, name: &str) -> Option<&str> {
        self.used.borrow_mut().push(name.into());
        self.options.get(name).and_then(|v| v.as_deref())
    }

    /// The parsed value of `--name`, or `default` when absent.
    pub fn value<T: FromStr>(&self, name: &str, default: T) -> Result<T, String>
    where
        T::Err: Display,
    {
        match self.string(name) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|e| format!("--{name} {text}: {e}")),
        }
    }

    /// Fails on an option no command asked about (call after reading all options).
    pub fn reject_unknown(&self) -> Result<(), String> {
        let used = self.used.borrow();
        match self.options.keys().find(|k| !used.contains(k)) {
            Some(name) => Err(format!("unknown option --{name}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options_flags_and_positionals() {
        let words = [
            "bench",
            "attention",
            "--ctx",
            "512",
            "--kv=f16",
            "--chat",
            "-n",
            "5",
        ];
        let args = Args::parse(words.iter().map(|s| s.to_string())).unwrap();
        assert_eq!(args.positional(1), Some("attention"));
        assert_eq!(args.value("ctx", 0usize).unwrap(), 512);
        assert_eq!(args.string("kv"), Some("f16"));
        assert!(args.flag("chat"));
        assert_eq!(args.value("n", 0usize).unwrap(), 5);
        assert!(args.reject_unknown().is_ok());
        assert!(args.value::<usize>("kv", 0).is_err());
        let args = Args::parse(["--bogus".to_string(), "1".into()]).unwrap();
        assert!(args.reject_unknown().is_err());
        assert!(Args::parse(["--ctx".to_string()]).is_err());
    }
}
