//! `WIDTHxHEIGHT`, as every command line here writes a frame size.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    pub const fn new(width: u32, height: u32) -> Size {
        Size { width, height }
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        s.split_once('x')
            .and_then(|(w, h)| Some(Size { width: w.trim().parse().ok()?, height: h.trim().parse().ok()? }))
            .filter(|z| z.width > 0 && z.height > 0)
            .ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 1280x720"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!("1280x720".parse(), Ok(Size::new(1280, 720)));
        assert_eq!("1280x720".parse::<Size>().unwrap().to_string(), "1280x720");
        for bad in ["", "1280", "x720", "0x5", "ax b", "12x-3"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }
}
