"""The reference pretraining loop behind `launch/`: run files, process groups, models, data,
checkpoints and the monitor. The plugin never imports it; it imports the plugin."""
