"""Real servers the tests start on loopback, each on a free port, from Debian's packages
(`make services` installs them)."""
