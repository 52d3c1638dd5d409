"""Service handlers plugged into the chroot-helper server (exec, mail, dns)."""
