"""The daemon, its control socket and the mount commands."""
