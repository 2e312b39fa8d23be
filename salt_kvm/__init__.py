"""salt-kvm: libvirt/KVM for Salt (cloud driver, execution and state modules).

The loader modules (``salt_kvm/clouds``, ``_modules``, ``_states``) are thin:
they translate between Salt and the library modules of this package, where
the work is done.
"""

__version__ = "0.1.0"
