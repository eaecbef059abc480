import {
  formatAge,
  formatBytes,
  formatCredits,
  formatDuration,
  formatMetric,
  formatTimeLeft,
  hoursLeft,
  joinArgs,
  splitArgs
} from '../src/format';

test.each([
  [0, '0 B'],
  [512, '512 B'],
  [1536, '1.5 KiB'],
  [5 * 1024 ** 3, '5.0 GiB'],
  [null, '—']
])('formatBytes(%p) = %p', (n, want) => {
  expect(formatBytes(n)).toBe(want);
});

test.each([
  [5, '5s'],
  [63, '1m 03s'],
  [3 * 3600 + 7 * 60, '3h 07m'],
  [2 * 86400 + 4 * 3600, '2d 04h'],
  [-1, '—'],
  [null, '—']
])('formatDuration(%p) = %p', (s, want) => {
  expect(formatDuration(s)).toBe(want);
});

test('credits and time left at the burn rate', () => {
  expect(formatCredits(3.254)).toBe('3.25');
  expect(formatCredits(1204.4)).toBe('1,204');
  expect(hoursLeft(10, 4)).toBe(2.5);
  expect(hoursLeft(10, 0)).toBeNull();
  expect(hoursLeft(-3, 1)).toBe(0);
  expect(formatTimeLeft(10, 4)).toBe('2h 30m left at 4.00/h');
  expect(formatTimeLeft(10, null)).toBe('nothing running');
});

test.each([
  [0.12345, '0.1235'],
  [3, '3'],
  [1e-5, '1.00e-5'],
  ['nan', 'nan'],
  [null, '—']
])('formatMetric(%p) = %p', (v, want) => {
  expect(formatMetric(v)).toBe(want);
});

test('formatAge', () => {
  expect(formatAge('2026-01-01T00:00:00Z', Date.parse('2026-01-01T00:02:00Z'))).toBe('2m 00s ago');
  expect(formatAge(null, 0)).toBe('never');
});

describe('arguments edited as one line', () => {
  test.each([
    [['--lr', '0.1'], '--lr 0.1'],
    [['--name', 'two words'], "--name 'two words'"],
    [['--q', "it's"], `--q 'it'"'"'s'`],
    [['--empty', ''], "--empty ''"]
  ])('%p round-trips through %p', (args, line) => {
    expect(joinArgs(args)).toBe(line);
    expect(splitArgs(line)).toEqual(args);
  });

  test.each([
    ['  --lr   0.5 ', ['--lr', '0.5']],
    ['"a \\"b\\"" c\\ d', ['a "b"', 'c d']],
    ['--x=1 -- --y', ['--x=1', '--', '--y']]
  ])('split %p', (line, want) => {
    expect(splitArgs(line)).toEqual(want);
  });

  test('an unclosed quote is refused', () => {
    expect(() => splitArgs("--a 'b")).toThrow("unclosed ' quote");
  });
});
