//! How sessions get their encoders, and how many may live at once.
//!
//! An encoder is the biggest thing a session holds (x264 at 1920x1080 keeps
//! about 16 MB; at 4096x4096, over 100 MB). So the host caps how many are
//! live and how many pixels they encode between them (`--max-encoders`,
//! `--max-encoder-mpix`); a session that would go over is answered ERROR
//! until others close theirs (sessions close an idle encoder by themselves,
//! `--encoder-idle-secs`).

use std::sync::{Arc, Mutex};

use hxfr_encode::{EncodeError, Encoder, EncoderConfig, EncoderKind};

/// Encoder threads per session when the operator leaves it to us: the
/// encoder's own choice grows with the cores (x264: 1.5 per core), and a
/// host may run a thousand sessions.
const AUTO_THREADS_MAX: u32 = 4;

/// How many encoders are live, and their pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncoderGauge {
    pub live: usize,
    /// Width × height, summed over the live encoders.
    pub pixels: u64,
}

/// Opens encoders for sessions: the backend (`auto` already resolved), the
/// settings the host operator chose, and the host-wide caps.
pub(crate) struct EncoderFactory {
    kind: EncoderKind,
    preset: String,
    threads: u32,
    max_live: usize,
    max_pixels: u64,
    live: Arc<Mutex<EncoderGauge>>,
}

/// Why a session has no encoder.
pub(crate) enum OpenError {
    /// Over a host-wide cap: the message says which.
    Busy(String),
    Failed(EncodeError),
}

/// An encoder that counts against the caps until dropped.
pub(crate) struct LiveEncoder {
    enc: Box<dyn Encoder>,
    _lease: Lease,
}

impl std::ops::Deref for LiveEncoder {
    type Target = dyn Encoder;
    fn deref(&self) -> &Self::Target {
        &*self.enc
    }
}

impl std::ops::DerefMut for LiveEncoder {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut *self.enc
    }
}

struct Lease {
    pixels: u64,
    live: Arc<Mutex<EncoderGauge>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.live.lock().unwrap();
        g.live -= 1;
        g.pixels -= self.pixels;
        crate::memory::trim_soon();
    }
}

impl EncoderFactory {
    pub fn new(kind: EncoderKind, preset: String, threads: u32, max_live: usize, max_pixels: u64) -> Self {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32).min(AUTO_THREADS_MAX),
            n => n,
        };
        EncoderFactory { kind, preset, threads, max_live, max_pixels, live: Arc::default() }
    }

    pub fn kind(&self) -> &EncoderKind {
        &self.kind
    }

    pub fn gauge(&self) -> EncoderGauge {
        *self.live.lock().unwrap()
    }

    /// A config for a `width × height` encoder with the operator's settings
    /// and the protocol's default rate; the session sets its own rate.
    pub fn config(&self, width: u32, height: u32) -> EncoderConfig {
        EncoderConfig { preset: self.preset.clone(), threads: self.threads, ..EncoderConfig::new(width, height) }
    }

    /// Opens an encoder if the caps allow one more of its size.
    /// Keeps `slot` an encoder for `frame`'s size: reopened when the size
    /// changes (the old one closed first, so it no longer counts against the
    /// host's caps), with `tune` applied to its config, and told to `stats`.
    pub fn ensure(
        &self,
        slot: &mut Option<LiveEncoder>,
        frame: &hxfr_encode::Frame<'_>,
        stats: &std::sync::Mutex<crate::stats::SessionStats>,
        tune: impl FnOnce(&mut EncoderConfig),
    ) -> Result<(), OpenError> {
        if let Some(e) = slot.as_ref() {
            let c = e.config();
            if (c.width, c.height) == (frame.width, frame.height) {
                return Ok(());
            }
            tracing::info!("size {}x{} -> {}x{}: new encoder", c.width, c.height, frame.width, frame.height);
            *slot = None;
        }
        let mut cfg = self.config(frame.width, frame.height);
        tune(&mut cfg);
        let enc = self.open(&cfg)?;
        {
            let s = &mut stats.lock().unwrap().info;
            s.encoder = enc.name().to_string();
            s.width = frame.width;
            s.height = frame.height;
        }
        tracing::debug!(encoder = enc.name(), "{}x{} @ {} bit/s", cfg.width, cfg.height, cfg.bitrate);
        *slot = Some(enc);
        Ok(())
    }

    pub fn open(&self, config: &EncoderConfig) -> Result<LiveEncoder, OpenError> {
        let lease = self.lease(config.width as u64 * config.height as u64)?;
        let enc = hxfr_encode::open(&self.kind, config).map_err(OpenError::Failed)?;
        Ok(LiveEncoder { enc, _lease: lease })
    }

    fn lease(&self, pixels: u64) -> Result<Lease, OpenError> {
        let mut g = self.live.lock().unwrap();
        if g.live >= self.max_live {
            let max = self.max_live;
            return Err(OpenError::Busy(format!(
                "host busy: {max} encoders are live, the host's limit (--max-encoders {max}); try again later"
            )));
        }
        if g.pixels + pixels > self.max_pixels {
            let mpix = |p: u64| p as f64 / 1e6;
            return Err(OpenError::Busy(format!(
                "host busy: {:.1} of {:.1} megapixels of encoders are live, this frame needs {:.1} more (--max-encoder-mpix); try again later",
                mpix(g.pixels),
                mpix(self.max_pixels),
                mpix(pixels)
            )));
        }
        g.live += 1;
        g.pixels += pixels;
        Ok(Lease { pixels, live: self.live.clone() })
    }
}
