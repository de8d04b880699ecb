"""The floor every layer stands on: configuration, paths, files, errors, labels, the device, the command line. Imports
nothing of ichpipe above it."""
