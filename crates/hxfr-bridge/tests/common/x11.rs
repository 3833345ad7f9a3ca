//! A private X server (Xvfb) with an xterm filling most of it, stopped on drop.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};

pub struct Xvfb {
    pub display: String,
    children: Vec<Child>,
}

impl Xvfb {
    /// Starts Xvfb at `width`x`height` on a free display (it names it on a
    /// pipe), then `xterm` at the top left.
    pub fn start(width: u32, height: u32) -> Xvfb {
        let (r, w) = pipe();
        // Xvfb writes the display number to fd 3 of its own.
        let w_raw = w.as_raw_fd();
        let mut cmd = Command::new("Xvfb");
        cmd.args(["-displayfd", "3", "-nolisten", "tcp", "-screen", "0", &format!("{width}x{height}x24")]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: between fork and exec only dup2, which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::dup2(w_raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let xvfb = cmd.spawn().expect("Xvfb (Debian package xvfb)");
        drop(w);
        // One line: Xvfb keeps the pipe open, so read to the newline, not to the end.
        let mut name = String::new();
        let mut pipe = std::fs::File::from(r);
        let mut byte = [0u8; 1];
        while pipe.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            name.push(byte[0] as char);
        }
        let display = format!(":{}", name.trim());
        assert!(display.len() > 1, "Xvfb named no display");
        let mut x = Xvfb { display, children: vec![xvfb] };
        let term = Command::new("xterm")
            .args(["-display", &x.display, "-geometry", "200x50+0+0", "-e", "sh"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xterm (Debian package xterm)");
        x.children.push(term);
        x
    }

    /// Runs a program on this display; it is stopped with the server.
    pub fn spawn(&mut self, cmd: &mut Command) -> &mut Child {
        let child = cmd.env("DISPLAY", &self.display).spawn().expect("spawning an X client");
        self.children.push(child);
        self.children.last_mut().unwrap()
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: pipe(2) just returned these two descriptors, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
