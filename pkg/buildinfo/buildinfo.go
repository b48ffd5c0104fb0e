// Package buildinfo carries the version string stamped in at build time.
package buildinfo

// Version is set with -ldflags "-X github.com/portguard/portguard/pkg/buildinfo.Version=...".
var Version = "dev"
