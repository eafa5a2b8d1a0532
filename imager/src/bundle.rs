//! (in progress) owned by the bundle work: see issue 4.
