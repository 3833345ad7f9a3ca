//! How sessions get their encoders.

use hxfr_encode::{EncodeError, Encoder, EncoderConfig, EncoderKind};

/// Opens encoders for sessions: the backend (`auto` already resolved) and
/// the settings the host operator chose.
pub(crate) struct EncoderFactory {
    kind: EncoderKind,
    preset: String,
    threads: u32,
}

impl EncoderFactory {
    pub fn new(kind: EncoderKind, preset: String, threads: u32) -> EncoderFactory {
        EncoderFactory { kind, preset, threads }
    }

    pub fn kind(&self) -> &EncoderKind {
        &self.kind
    }

    /// A config for a `width × height` encoder with the operator's settings
    /// and the protocol's default rate; the session sets its own rate.
    pub fn config(&self, width: u32, height: u32) -> EncoderConfig {
        EncoderConfig { preset: self.preset.clone(), threads: self.threads, ..EncoderConfig::new(width, height) }
    }

    pub fn open(&self, config: &EncoderConfig) -> Result<Box<dyn Encoder>, EncodeError> {
        hxfr_encode::open(&self.kind, config)
    }
}
