"""The shared libvirt layer: connections, the XML model, volumes, qemu-img, host facts, locks,
rollback, and the checks every capability uses. It imports no other salt-kvm subpackage."""
