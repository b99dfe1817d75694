//! An instance's status as a type, with its legal transitions.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
    /// Waiting out `restart_delay` before an automatic restart.
    Restarting,
    /// Stopped to make room (eviction, idle timeout) with its weights kept loaded while the
    /// memory budget allows: its next start only creates a context.
    Parked,
}

/// What happens to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A user (or on-demand routing) asks for it to start.
    Start,
    /// The engine loaded the model.
    Loaded,
    /// The engine could not load the model.
    LoadFailed,
    /// A user asks for it to stop.
    Stop,
    /// The engine thread has ended after a stop.
    Halted,
    /// The engine thread ended without being asked to.
    Crashed,
    /// The supervisor schedules an automatic restart of a failed instance.
    ScheduleRestart,
    /// The supervisor stops it to make room or after its idle timeout, keeping its weights.
    Park,
    /// The engine thread has ended after a park (its context is freed).
    ContextFreed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} an instance that is {from}")]
pub struct IllegalTransition {
    pub from: Status,
    pub event: Event,
}

impl Status {
    pub fn transition(self, event: Event) -> Result<Status, IllegalTransition> {
        use Event::*;
        use Status::*;
        match (self, event) {
            (Stopped | Failed | Restarting | Status::Parked, Start) => Ok(Starting),
            (Failed, ScheduleRestart) => Ok(Restarting),
            // Stopping an instance that waits to be restarted cancels the restart.
            (Restarting, Stop) => Ok(Stopped),
            (Starting, Loaded) => Ok(Running),
            (Starting, LoadFailed) => Ok(Failed),
            (Starting | Running, Stop) => Ok(Stopping),
            (Running, Park) => Ok(Stopping),
            (Stopping, ContextFreed) => Ok(Status::Parked),
            // Stopping a parked instance frees its weights.
            (Status::Parked, Stop) => Ok(Stopped),
            (Stopping, Halted) => Ok(Stopped),
            // A load that ends while a stop is in progress: the stop wins.
            (Stopping, Loaded | LoadFailed) => Ok(Stopping),
            (Running, Crashed) => Ok(Failed),
            (Stopping, Crashed) => Ok(Stopped),
            (from, event) => Err(IllegalTransition { from, event }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Stopped => "stopped",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Failed => "failed",
            Status::Restarting => "restarting",
            Status::Parked => "parked",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match self {
            Event::Start => "start",
            Event::Loaded => "finish loading",
            Event::LoadFailed => "fail loading",
            Event::Stop => "stop",
            Event::Halted => "halt",
            Event::Crashed => "crash",
            Event::ScheduleRestart => "schedule a restart of",
            Event::Park => "park",
            Event::ContextFreed => "finish parking",
        };
        f.write_str(verb)
    }
}

#[cfg(test)]
mod tests {
    use super::Event::*;
    use super::Status::*;
    use super::*;

    #[test]
    fn normal_life() {
        let s = Stopped.transition(Start).unwrap();
        let s = s.transition(Loaded).unwrap();
        assert_eq!(s, Running);
        let s = s.transition(Stop).unwrap().transition(Halted).unwrap();
        assert_eq!(s, Stopped);
    }

    #[test]
    fn failed_can_be_started_again() {
        assert_eq!(Starting.transition(LoadFailed).unwrap(), Failed);
        assert_eq!(Failed.transition(Start).unwrap(), Starting);
    }

    #[test]
    fn illegal_transitions_are_errors() {
        assert_eq!(Running.transition(Start), Err(IllegalTransition { from: Running, event: Start }));
        assert!(Stopped.transition(Stop).is_err());
        assert!(Stopping.transition(Start).is_err());
        assert_eq!(Running.transition(Start).unwrap_err().to_string(), "cannot start an instance that is running");
    }

    #[test]
    fn restarting_can_start_or_be_stopped() {
        assert_eq!(Failed.transition(ScheduleRestart).unwrap(), Restarting);
        assert_eq!(Restarting.transition(Start).unwrap(), Starting);
        assert_eq!(Restarting.transition(Stop).unwrap(), Stopped);
        assert!(Running.transition(ScheduleRestart).is_err());
    }

    #[test]
    fn parking_keeps_a_way_back_and_a_way_out() {
        let s = Running.transition(Park).unwrap();
        assert_eq!(s, Stopping);
        assert_eq!(s.transition(ContextFreed).unwrap(), Status::Parked);
        assert_eq!(Status::Parked.transition(Start).unwrap(), Starting);
        assert_eq!(Status::Parked.transition(Stop).unwrap(), Stopped);
        assert!(Status::Parked.transition(Park).is_err());
        assert!(Starting.transition(Park).is_err());
    }

    #[test]
    fn stop_during_load_wins() {
        let s = Starting.transition(Stop).unwrap();
        assert_eq!(s.transition(Loaded).unwrap(), Stopping);
        assert_eq!(s.transition(Halted).unwrap(), Stopped);
    }
}
