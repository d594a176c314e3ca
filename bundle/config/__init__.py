"""What a user gives and what they get back when it is wrong: the settings table (types, README rows), boolean
settings, paths, unread config keys, and the bundle's one exception type (:class:`bundle.config.errors.BundleError`)."""
