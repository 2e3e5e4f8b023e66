//! One operation per volume at a time: a second concurrent call on the same
//! volume gets `ABORTED` (the CO retries it), as the CSI spec asks.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Volumes with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases the volume when dropped.
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Marks `key` busy for `op`, or `ABORTED` if it already is.
    pub fn begin(&self, key: &str, op: &str) -> Result<Guard> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "{op}: another operation on volume {key} is in progress; retry"
            )));
        }
        tracing::debug!(volume = key, op, "operation started");
        Ok(Guard {
            busy: self.busy.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let g = f.begin("v", "CreateVolume").unwrap();
        let e = f.begin("v", "DeleteVolume").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(f.begin("w", "DeleteVolume").is_ok());
        drop(g);
        assert!(f.begin("v", "DeleteVolume").is_ok());
    }
}
