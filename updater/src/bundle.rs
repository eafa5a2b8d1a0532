//! (in progress) owned by the bundle/install work: see issue 4.
