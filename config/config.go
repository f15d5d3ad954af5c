// Package config loads sealdisk's configuration with viper: a YAML file, then SEALDISK_*
// environment variables, then flags, in rising precedence. Unknown keys and bad values fail
// at load time with an error naming the key.
package config

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// Config is the whole configuration.
type Config struct {
	Log LogConfig `mapstructure:"log"`
	PSP PSPConfig `mapstructure:"psp"`
}

// LogConfig controls structured logging.
type LogConfig struct {
	Level  string `mapstructure:"level"`  // debug, info, warn, error
	Format string `mapstructure:"format"` // text or json
}

// PSPConfig locates the chip identity.
type PSPConfig struct {
	Dir   string `mapstructure:"dir"`
	ASIDs int    `mapstructure:"asids"`
}

// Defaults are applied before the file, environment and flags.
func defaults(v *viper.Viper) {
	v.SetDefault("log.level", "info")
	v.SetDefault("log.format", "text")
	v.SetDefault("psp.dir", "")
	v.SetDefault("psp.asids", 509)
}

// Load reads path (optional: "" skips the file), SEALDISK_* environment variables
// (SEALDISK_PSP_DIR for psp.dir) and any flags in fs whose names are config keys with dots
// replaced by dashes (psp-dir).
func Load(path string, fs *pflag.FlagSet) (*Config, error) {
	v := viper.New()
	defaults(v)
	v.SetEnvPrefix("SEALDISK")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if path != "" {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("failed to read config: %w", err)
		}
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("failed to parse config %s: %w", path, err)
		}
	}
	if fs != nil {
		for _, key := range v.AllKeys() {
			if f := fs.Lookup(strings.ReplaceAll(key, ".", "-")); f != nil {
				if err := v.BindPFlag(key, f); err != nil {
					return nil, fmt.Errorf("failed to bind flag --%s: %w", f.Name, err)
				}
			}
		}
	}
	var c Config
	err := v.UnmarshalExact(&c, func(dc *mapstructure.DecoderConfig) { dc.ErrorUnused = true })
	if err != nil {
		return nil, fmt.Errorf("invalid config: %w", err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// KeyError names the configuration key that is wrong.
type KeyError struct {
	Key    string
	Reason string
}

func (e *KeyError) Error() string { return fmt.Sprintf("invalid config key %s: %s", e.Key, e.Reason) }

// Validate checks values that types alone cannot.
func (c *Config) Validate() error {
	var errs []error
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, &KeyError{"log.level", fmt.Sprintf("%q is not debug, info, warn or error", c.Log.Level)})
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		errs = append(errs, &KeyError{"log.format", fmt.Sprintf("%q is not text or json", c.Log.Format)})
	}
	if c.PSP.ASIDs < 1 || c.PSP.ASIDs > 1<<16 {
		errs = append(errs, &KeyError{"psp.asids", fmt.Sprintf("%d is outside 1..65536", c.PSP.ASIDs)})
	}
	if c.PSP.Dir != "" {
		if fi, err := os.Stat(c.PSP.Dir); err != nil || !fi.IsDir() {
			errs = append(errs, &KeyError{"psp.dir", fmt.Sprintf("%s is not a directory", c.PSP.Dir)})
		}
	}
	return errors.Join(errs...)
}
