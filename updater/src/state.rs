//! (in progress) owned by the slot/state work: see issue 4.
