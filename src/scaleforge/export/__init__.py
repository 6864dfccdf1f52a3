"""Export: a finished run's model as a file other runtimes load (`formats.export_run`)."""
