// `npm pack` helper: copy the API's .proto into the package (prepack) and remove
// the copy again (postpack), so a checkout always loads ../../protos directly.
//   node scripts/protos.mjs copy|clean
import { cpSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const pkg = join(dirname(fileURLToPath(import.meta.url)), '..');
const dest = join(pkg, 'proto');
const action = process.argv[2];

if (action === 'copy') {
  rmSync(dest, { recursive: true, force: true });
  cpSync(join(pkg, '..', '..', 'protos', 'keybroker'), join(dest, 'keybroker'), { recursive: true });
} else if (action === 'clean') {
  rmSync(dest, { recursive: true, force: true });
} else {
  console.error('usage: node scripts/protos.mjs copy|clean');
  process.exit(2);
}
