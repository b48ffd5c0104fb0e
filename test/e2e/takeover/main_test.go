package takeover

import (
	"os"
	"testing"

	"github.com/portguard/portguard/test/testbed"
)

func TestMain(m *testing.M) { os.Exit(testbed.Main(m)) }
