"""External disks of a guest: the request, its checks against every other domain, and the
attach, detach and resize operations."""
