"""Backups of guests: the store of points, the two backup methods, snapshots, verification,
second copies and restores."""
