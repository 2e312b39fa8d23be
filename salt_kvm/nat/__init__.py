"""NAT port forwards: the rules, their desired state on the hypervisor, the host firewall, and
the libvirt hooks that keep them alive across restarts."""
