import {
  compareCode,
  parseJobLine,
  parseRunLine,
  pullCode,
  pushCode,
  py,
  runCode
} from '../src/jobs';

test('Python literals escape quotes and newlines', () => {
  expect(py('a"b\nc')).toBe('"a\\"b\\nc"');
});

test('push code names the dataset and folder as literals', () => {
  const code = pushCode('mnist', 'data/my "set"');
  expect(code).toContain('_push(_C(), "mnist", "data/my \\"set\\"", on_progress=_p)');
});

test('run code passes entry, arguments, GPUs and datasets', () => {
  const code = runCode({
    folder: 'proj',
    entry: 'train.py',
    args: ['--lr', '0.1'],
    gpus: 2,
    datasets: ['mnist']
  });
  expect(code).toContain(
    '_run(_C(), "train.py", ["--lr","0.1"], folder="proj", gpus=2, datasets=["mnist"])'
  );
});

test.each([
  [
    'NSML-PROGRESS {"phase": "upload", "done": 5, "total": 10}',
    { kind: 'progress', progress: { phase: 'upload', done: 5, total: 10 } }
  ],
  ['NSML-RESULT {"ref": "mnist@2"}', { kind: 'result', result: { ref: 'mnist@2' } }],
  ['NSML-ERROR dataset not found', { kind: 'error', message: 'dataset not found' }],
  ['NSML-PROGRESS {broken', null],
  ['other output', null]
])('parseJobLine(%p)', (line, want) => {
  expect(parseJobLine(line)).toEqual(want);
});

test('compare code loads the magics and plots the sessions', () => {
  expect(compareCode(['a/d/1', 'a/d/2'])).toMatch(
    /load_extension\('nsml_magics'\)\n%nsml plot a\/d\/1 a\/d\/2$/
  );
});

describe('the run dialog line', () => {
  test.each([
    ['no line: no arguments', '', { args: [], gpus: 0, datasets: [] }],
    ['without --: all arguments', '--lr 0.1', { args: ['--lr', '0.1'], gpus: 0, datasets: [] }],
    [
      'options before --',
      '--gpus 0.5 -d mnist --dataset cifar@2 -- --lr "0.1 x"',
      { args: ['--lr', '0.1 x'], gpus: 0.5, datasets: ['mnist', 'cifar@2'] }
    ],
    ['only options', '--gpus 2 --', { args: [], gpus: 2, datasets: [] }]
  ])('%s', (_, line, want) => {
    expect(parseRunLine(line)).toEqual(want);
  });

  test.each([
    ['an unknown option', '--cpus 2 -- x', /Unknown option --cpus: give --gpus N or -d DATASET/],
    ['a missing value', '-d --', /-d needs a value/],
    ['GPUs not a number', '--gpus many --', /--gpus takes a number of GPUs .*not many/],
    ['an unclosed quote', "'a", /quote/]
  ])('refused: %s', (_, line, message) => {
    expect(() => parseRunLine(line)).toThrow(message);
  });
});

test('pull code names the dataset and picks a free folder next to the one asked for', () => {
  const code = pullCode('digits@2', 'work/digits-v2');
  expect(code).toContain('_d0 = _d = _P("work/digits-v2")');
  expect(code).toContain('_pull(_C(), "digits@2", _d, on_progress=_p)');
  expect(code).toContain('_d0.with_name(f"{_d0.name}-{_n}")');
});
