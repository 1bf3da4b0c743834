//! Network faults for tests: cutting a host off with the kernel's firewall.

use std::net::IpAddr;
use std::process::Command;

use crate::Result;

/// While alive, drops every packet from and to one loopback address (any
/// 127.x.y.z works on Linux): a partition, as the network would make one,
/// that no code under test can tell from a real one. Removed on drop, also
/// when the test panics.
///
/// Needs root and the `iptables` command (scripts/test installs it).
#[derive(Debug)]
pub struct Isolation {
    ip: IpAddr,
}

fn iptables(action: &str, direction: &str, ip: IpAddr) -> Result<()> {
    let out = Command::new("iptables")
        .args([action, "INPUT", direction, &ip.to_string(), "-j", "DROP"])
        .output()
        .map_err(|e| {
            format!("iptables: {e} (install it: apt-get install -y iptables; needs root)")
        })?;
    if !out.status.success() {
        return Err(format!(
            "iptables {action} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

impl Isolation {
    /// Cuts `ip` off: nothing it sends arrives, nothing sent to it arrives.
    ///
    /// # Errors
    /// If the rules cannot be installed.
    pub fn isolate(ip: IpAddr) -> Result<Self> {
        iptables("-I", "-s", ip)?;
        if let Err(e) = iptables("-I", "-d", ip) {
            let _ = iptables("-D", "-s", ip);
            return Err(e);
        }
        Ok(Self { ip })
    }

    /// Heals the partition now.
    pub fn heal(self) {}
}

impl Drop for Isolation {
    fn drop(&mut self) {
        let _ = iptables("-D", "-s", self.ip);
        let _ = iptables("-D", "-d", self.ip);
    }
}
